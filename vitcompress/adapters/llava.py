"""transformers LLaVA family: ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNext``
(anyres crops), ``LlavaNextVideo`` and ``LlavaOnevision`` (images and videos).

The hook. A compressed model's ``forward`` (a forward pre-hook, registered first) and ``generate``
(a wrapper) see every call first: when pixels come in (the prefill), the model's
:class:`~vitcompress.runtimes.vlm.LlavaRuntime` encodes them with the model's own ``get_image_features`` /
``get_video_features``, lets the method reduce the visual tokens, and rewrites the prompt
(:mod:`vitcompress.runtimes.prompt`) so that each image / video has exactly as many placeholder tokens as it
now has features. The reduced features go to the model as ``mm_encoder_outputs``, so the model's
own placeholder check and ``masked_scatter`` run unchanged, and ``generate`` builds its KV cache,
masks and positions from the rewritten prompt; decoding steps carry no pixels and pass straight
through. ``generate`` returns the caller's original prompt followed by the generated tokens, so
``out[:, inputs["input_ids"].shape[1]:]`` still slices the new tokens. A direct ``forward`` returns
logits for the rewritten sequence (one position per token the language model saw);
:func:`vitcompress.stats` gives the token counts of the calling thread's last prefill.

What reduces where:

* ``target="llava"`` methods reduce what they are defined on; a modality a method does not reduce
  is encoded by the model and passed on unchanged. Token-level methods (``unit="crop"``,
  tokencorr) reduce each image crop from signals of the vision tower -- LLaVA-1.5 images and
  LLaVA-NeXT / NeXT-Video anyres crops (kept in the model's unpadded, newline-separated layout: a
  row's newline token stays when a token of its row does). Frame-assignment methods
  (``unit="video"``, QuoTA) reduce the frames of each video of NeXT-Video and OneVision, or the
  images of one sample of LLaVA-1.5 taken as the frames of a video. On OneVision (a SigLIP tower
  without [CLS]) crop methods that read such towers (visionzip, cdpruner) reduce each image's crops
  and each video's frames (``frames_as_crops``), on the full patch grid; the methods pack them.
* ``target="vit"`` methods (tome, pitome, zero_tprune) run inside the CLIP vision tower through
  the HF CLIP adapter, on LLaVA-1.5 (whose features are the selected hidden state minus CLS, any
  length): the placeholders follow the shorter tower output. The anyres and video variants need
  the full patch grid after the tower (unpadding, pooling), so they refuse ViT methods.

Requirements: transformers >= 5 (the ``mm_encoder_outputs`` argument of ``forward``); older
versions, which merged features inside ``forward`` (``_merge_input_ids_with_image_features``) or
had no way to hand pre-encoded features in, are refused with the version found. tokencorr needs a
vision tower with a [CLS] token (CLIP); crop methods on OneVision need one without (SigLIP, as released).
"""
import inspect
import math
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..runtimes.language_model import LanguageModelParts, LanguageModelRuntime
from ..runtimes.vit import ViTRuntime
from ..runtimes.vlm import LlavaRuntime, TowerTaps
from .common import family_class, patch_vlm_prefill
from .hf_clip import HFCLIPVisionAdapter  # the tower's adapter, for ViT methods inside it

Tensor = torch.Tensor

# Per class: anyres image packing, the modalities it takes, video pooler_output as one tensor
# (OneVision flattens it) or a list, whether a CLIP-tower ViT method keeps the hook valid, and the
# modality a method reduces per crop ("crop") or per video ("video"), None where it cannot.
_FAMILIES = {
    "LlavaForConditionalGeneration": dict(anyres=False, modalities=("image",), video_tensor=False, vit=True,
                                          crop="image", video="image"),
    "LlavaNextForConditionalGeneration": dict(anyres=True, modalities=("image",), video_tensor=False, vit=False,
                                              crop="image", video=None),
    "LlavaNextVideoForConditionalGeneration": dict(anyres=True, modalities=("image", "video"), video_tensor=False,
                                                   vit=False, crop="image", video="video"),
    "LlavaOnevisionForConditionalGeneration": dict(anyres=True, modalities=("image", "video"), video_tensor=True,
                                                   vit=False, crop="image", video="video"),
}
_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


#: where transformers defines each class of :data:`_FAMILIES` ("module.Name" -> the class's name)
_CLASSES = {f"transformers.models.{package}.modeling_{package}.{name}": name for package, name in (
    ("llava", "LlavaForConditionalGeneration"), ("llava_next", "LlavaNextForConditionalGeneration"),
    ("llava_next_video", "LlavaNextVideoForConditionalGeneration"),
    ("llava_onevision", "LlavaOnevisionForConditionalGeneration"))}


def _family_of(model) -> Optional[str]:
    name = family_class(model, _CLASSES)
    return None if name is None else _CLASSES[name]


def _tower_layers(tower):
    inner = getattr(tower, "vision_model", tower)  # transformers 4.x wraps CLIPVisionTransformer
    encoder = getattr(inner, "encoder", None)
    return inner, getattr(encoder, "layers", None)


class LlavaAdapter:
    family = "transformers.LlavaForConditionalGeneration"
    description = ("transformers LLaVA models (LlavaForConditionalGeneration, LlavaNext-, LlavaNextVideo-, "
                   "LlavaOnevisionForConditionalGeneration)")
    targets = ("llava", "vit")

    @staticmethod
    def matches(model) -> bool:
        return _family_of(model) is not None

    def __init__(self, model):
        import transformers

        self.model = model
        self.family_name = _family_of(model)
        self.family = f"transformers.{self.family_name}"
        if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
            raise TypeError(f"vitcompress's LLaVA adapter needs transformers >= 5 (forward(mm_encoder_outputs=...) "
                            f"takes pre-encoded visual tokens); found transformers {transformers.__version__}, "
                            "which merges features inside forward. Upgrade transformers.")
        self.base = model.model
        self.config = model.config
        self.tower = self.base.vision_tower
        self.tower_inner, self.tower_layers = _tower_layers(self.tower)
        # The model module's own crop count for an image size (a function: deepcopy-able, unlike a module).
        self.num_crops = getattr(sys.modules[type(self.base).__module__], "image_size_to_num_patches", None)
        text = self.config.text_config
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (getattr(text, "pad_token_id", None) or 0)
        self.variant = "clip" if type(self.tower).__name__.startswith("CLIP") else None
        onevision = self.family_name == "LlavaOnevisionForConditionalGeneration"
        self.frames_as_crops = ("video",) if onevision else ()  # a crop method reduces each frame as a crop

    # ---------------------------------------------------------------- compress() hooks
    def make_runtime(self, spec, options, budget, common) -> LlavaRuntime:
        if spec.target == "vit":
            return self._vit_runtime(spec, options, budget, common)
        if spec.unit == "language_model":
            return LanguageModelRuntime(self, spec, options, budget, self.language_model_parts())
        if self.unit_modality(spec.unit) is None:
            supported = [n for n, f in _FAMILIES.items() if f[spec.unit]]
            raise TypeError(f"{spec.name} cannot reduce a {self.family_name}: it reduces "
                            f"{'image crops' if spec.unit == 'crop' else 'the frames of a video'}; supported: "
                            f"{', '.join(supported)}")
        taps = self._tower_taps(spec, options) if spec.unit == "crop" else None
        return LlavaRuntime(self, spec, options, budget, taps=taps)

    def _class_token(self) -> bool:
        return hasattr(getattr(self.tower_inner, "embeddings", None), "class_embedding")

    def _tower_taps(self, spec, options) -> TowerTaps:
        """The tower's q/k in the layers a crop method reads: a tower with a [CLS] token, or one without
        (OneVision's SigLIP) for a method that reads such towers (``reads_towers_without_cls``)."""
        class_token = self._class_token()
        if self.tower_layers is None or not (class_token or getattr(spec, "reads_towers_without_cls", False)):
            raise TypeError(f"{spec.name} reads the [CLS] attention of the vision tower; this "
                            f"{type(self.tower).__name__} has no [CLS] token (supported: CLIP vision towers)")
        if self.family_name == "LlavaOnevisionForConditionalGeneration" and class_token:
            raise TypeError(f"{spec.name} reduces the image crops of a LlavaOnevision with a vision tower without "
                            f"[CLS] (SigLIP, as every released checkpoint); this one has a {type(self.tower).__name__}")
        strategy = self.config.vision_feature_select_strategy
        if _FAMILIES[self.family_name]["anyres"] and strategy != ("default" if class_token else "full"):
            raise ValueError(f"{spec.name} on anyres crops needs vision_feature_select_strategy="
                             f"{'default' if class_token else 'full'!r} (got {strategy!r})")
        feature = self._feature_layer(spec) if spec.reads_features else None
        layers = spec.tower_layers(options, len(self.tower_layers), feature)  # fails now for a layer the tower lacks
        if spec.reads_features:
            layers = tuple(layers) + (feature,)
        attention = [self.tower_layers[i].self_attn for i in layers]
        return TowerTaps([(i, a.num_heads, a.scale) for i, a in zip(layers, attention)], class_token=class_token)

    def _feature_layer(self, spec) -> int:
        """The encoder layer whose output the model projects (``vision_feature_layer`` indexes the
        hidden states, the embeddings first)."""
        selected = self.config.vision_feature_layer
        if not isinstance(selected, int) or not 1 <= selected % (len(self.tower_layers) + 1):
            raise ValueError(f"{spec.name} reads the features of one encoder layer: vision_feature_layer must be "
                             f"an int naming a layer's output, got {selected!r}")
        patches_only = "default" if self._class_token() else "full"  # without [CLS] "default" would drop a patch
        if self.config.vision_feature_select_strategy != patches_only:
            raise ValueError(f"{spec.name} needs vision_feature_select_strategy={patches_only!r} (patch tokens only), "
                             f"got {self.config.vision_feature_select_strategy!r}")
        return selected % (len(self.tower_layers) + 1) - 1

    def _vit_runtime(self, spec, options, budget, common):
        if common.unmerge:
            raise ValueError("unmerge=True puts a ViT's tokens back on the patch grid, which would hand the language "
                             "model every visual token again; drop unmerge= for a ViT method inside LLaVA's tower")
        if not _FAMILIES[self.family_name]["vit"]:
            raise TypeError(f"ViT method {spec.name!r} inside the tower is supported on LlavaForConditionalGeneration "
                            f"only: {self.family_name} needs the full patch grid after the tower (anyres "
                            "unpadding, video pooling); use a method that reduces after the tower "
                            "(vitcompress.supported(model) lists them)")
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError("a ViT method inside the tower needs one vision_feature_layer (an int): hidden "
                             "states of different layers have different token counts once tokens are reduced")
        if not HFCLIPVisionAdapter.matches(self.tower):
            raise TypeError("ViT methods inside LLaVA's tower need a CLIP vision tower, got "
                            f"{type(self.tower).__name__}")
        tower = ViTRuntime(HFCLIPVisionAdapter(self.tower), spec, options, budget, common)
        return LlavaRuntime(self, spec, options, budget, tower=tower)

    def patch(self, runtime, patcher) -> None:
        patch_vlm_prefill(self.model, patcher)
        if runtime.taps is not None:
            for i in runtime.taps.hooked_layers():
                attn = self.tower_layers[i].self_attn
                patcher.hook(attn.q_proj.register_forward_hook(runtime.taps.hook(i, "q")))
                patcher.hook(attn.k_proj.register_forward_hook(runtime.taps.hook(i, "k")))
                patcher.hook(self.tower_layers[i].register_forward_hook(runtime.taps.hook(i, "hidden")))
        if runtime.tower is not None:
            runtime.tower.adapter.patch(runtime.tower, patcher)
        if isinstance(runtime, LanguageModelRuntime):
            runtime.hook_language_model(patcher)

    # ---------------------------------------------------------------- model knowledge
    def language_model_parts(self) -> LanguageModelParts:
        """The Llama-like decoder (its layers, output norm) and the placeholder ids of the visual tokens."""
        lm = self.base.language_model
        ids = tuple(self.token_id(m) for m in _FAMILIES[self.family_name]["modalities"])
        return LanguageModelParts(module=lm, layers=lm.layers, final_norm=lm.norm, visual_token_ids=ids)

    def modalities_in(self, inputs: Dict[str, Any]) -> List[str]:
        """The modalities whose pixels this call carries."""
        present = [m for m in _FAMILIES[self.family_name]["modalities"] if inputs.get(_PIXELS[m]) is not None]
        if present and inputs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixels or mm_encoder_outputs to a compressed LLaVA, not both")
        return present

    def unit_modality(self, unit: str) -> Optional[str]:
        """The modality whose items a method of ``unit`` reduces on this model: images' crops,
        videos' frames (LLaVA-1.5: the images of a sample as frames), or None."""
        return _FAMILIES[self.family_name][unit]

    def token_id(self, modality: str) -> int:
        return getattr(self.config, f"{modality}_token_id")

    def encode(self, modality: str, inputs: Dict[str, Any]):
        """The model's own encoder for ``modality`` on the call's arguments: its pooler_output."""
        fn = getattr(self.base, f"get_{modality}_features")
        params = inspect.signature(fn).parameters
        kwargs = {k: inputs[k] for k in params if k != "kwargs" and inputs.get(k) is not None}
        return fn(**kwargs, return_dict=True).pooler_output

    def project(self, modality: str, hidden: Tensor) -> Tensor:
        """The model's projector on tower features ``[..., C]`` (as ``get_{modality}_features`` applies it)."""
        return self.base.multi_modal_projector(hidden)

    def with_features(self, inputs: Dict[str, Any], encoded: Dict[str, Any]) -> Dict[str, Any]:
        """The call's arguments with each modality's pixels replaced by its encoded features."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = {k: v for k, v in inputs.items() if k not in {_PIXELS[m] for m in encoded}}
        out["mm_encoder_outputs"] = {m: BaseModelOutputWithPooling(pooler_output=f) for m, f in encoded.items()}
        return out

    def split_units(self, modality: str, pooled) -> List[Tensor]:
        """pooler_output -> one ``[L, D]`` tensor per image / video."""
        if isinstance(pooled, Tensor):
            return list(pooled) if pooled.dim() == 3 else [pooled]
        return [p.reshape(-1, p.shape[-1]) for p in pooled]

    def join_units(self, modality: str, units: List[Tensor], expansion: int = 1):
        """One ``[L, D]`` tensor per image / video -> pooler_output in the model's format;
        ``expansion``: rows generate() makes of each sample (beams x returned sequences)."""
        if modality == "video" and _FAMILIES[self.family_name]["video_tensor"]:
            if len({u.shape[0] for u in units}) == 1:
                return torch.stack(units)
            if expansion > 1:
                # transformers would repeat the joined tensor as a whole (A B A B for rows A A B B):
                # wrong features without an error
                raise ValueError(f"{self.family_name}: the videos of this batch kept different numbers of tokens, "
                                 "which generate() cannot expand for num_beams / num_return_sequences > 1; "
                                 "generate one video per call, or with num_beams=1 and num_return_sequences=1")
            return torch.cat(units)[None]  # the model flattens (batch, tokens) anyway
        return units

    def _patches_per_crop(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def uncompressed_counts(self, modality: str, inputs, reduced: List[int]) -> List[int]:
        """Tokens per image of the uncompressed model (LLaVA-1.5 with a ViT method in the tower)."""
        return [self._patches_per_crop() + (self.config.vision_feature_select_strategy == "full")] * len(reduced)

    def crop_layouts(self, inputs) -> List[Tuple[Tensor, int]]:
        """Per image: which crop/patch each token of the packed features is (``crop * N + patch``;
        -1 a row's newline; -2 CLS), and how many crops the image has."""
        num_patches = self._patches_per_crop()
        pixels = inputs["pixel_values"]
        device = pixels.device
        if not _FAMILIES[self.family_name]["anyres"]:
            cls = torch.full((1,), -2, dtype=torch.long, device=device)
            patches = torch.arange(num_patches, device=device)
            one = torch.cat([cls, patches]) if self.config.vision_feature_select_strategy == "full" else patches
            return [(one, 1)] * pixels.shape[0]
        sizes = inputs["image_sizes"]
        vc = self.config.vision_config
        crops = [self.num_crops(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=vc.image_size)
                 for s in sizes]
        onevision = self.family_name == "LlavaOnevisionForConditionalGeneration"
        if onevision and inputs.get("batch_num_images") is not None:  # the model's rule: an image of a
            per_image = [c for c in inputs["batch_num_images"].tolist() for _ in range(c)]  # multi-image sample
            crops = [n if c == 1 else 1 for n, c in zip(crops, per_image)]  # is one crop
        index = [torch.arange(n * num_patches, dtype=torch.float64, device=device).reshape(n, num_patches, 1)
                 for n in crops]
        newline = torch.full((1,), -1.0, dtype=torch.float64, device=device)
        if onevision:  # the unpadded layout before anyres_max's downsampling (the methods read its crop grid)
            packed, _ = self.base.pack_image_features(index, sizes, image_newline=newline,
                                                      vision_aspect_ratio=f"anyres_max_{10 ** 9}")
        else:
            packed, _ = self.base.pack_image_features(index, sizes, vision_feature_select_strategy="default",
                                                      image_newline=newline)
        return [(p.reshape(-1).long(), n) for p, n in zip(packed, crops)]

    def frame_layouts(self, inputs) -> List[Tuple[Tensor, int]]:
        """OneVision videos for a crop method: per video, its frames as crops in sequence (``frame * N +
        patch``, the full patch grid before the model's 2 x 2 pooling) and the video's one newline (-1)."""
        pixels = inputs["pixel_values_videos"]
        frames, num_patches = pixels.shape[1], self._patches_per_crop()
        layout = torch.cat([torch.arange(frames * num_patches), torch.tensor([-1])]).to(pixels.device)
        return [(layout, frames)] * pixels.shape[0]

    def video_units(self, modality: str, inputs, pooled):
        """Per image / video: its frames' pixels ``[F, 3, H, W]``, its frames' token grids
        ``[h, w, D]``, and the tokens the model puts before (CLS) and after (a newline) them."""
        vc = self.config.vision_config
        units = self.split_units(modality, pooled)
        if modality == "image":  # LLaVA-1.5: every image is one frame
            pixels, sizes = inputs["pixel_values"], inputs.get("image_sizes")
            cls = int(self.config.vision_feature_select_strategy == "full")
            out = []
            for i, u in enumerate(units):
                if sizes is not None:
                    h, w = (int(s) // vc.patch_size for s in sizes[i])
                else:
                    h = w = _square_side(u.shape[0] - cls)
                out.append((pixels[i:i + 1], [u[cls:].reshape(h, w, -1)], u[:cls], u[:0]))
            return out
        pixels = inputs["pixel_values_videos"]
        tail = 1 if _FAMILIES[self.family_name]["video_tensor"] else 0  # OneVision's trailing newline
        out = []
        for b, u in enumerate(units):
            frames = pixels.shape[1]
            per_frame = (u.shape[0] - tail) // frames
            side = _square_side(per_frame)
            grids = list(u[:frames * per_frame].reshape(frames, side, side, -1))
            out.append((pixels[b], grids, u[:0], u[frames * per_frame:]))
        return out


def _square_side(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"cannot see a square token grid in {tokens} tokens per frame")
    return side
