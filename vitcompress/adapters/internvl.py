"""transformers InternVL: ``InternVLForConditionalGeneration`` (the InternVL2.5 / InternVL3 ``-hf``
checkpoints), through the same VLM runtime as LLaVA (:class:`~vitcompress.runtimes.vlm.LlavaRuntime`:
the prefill hook, the prompt rewrite and ``generate`` with the KV cache are LLaVA's).

How InternVL lays out an image. The processor cuts an image into tiles of the tower's input size
(the grid closest to its aspect ratio, row-major) and, when there is more than one, appends a
**thumbnail** (the whole image resized to one tile) as the image's last tile; ``pixel_values``
holds every tile of the call, ``[tiles, 3, H, W]``, image after image in prompt order. InternViT
(a ViT with a [CLS] token) encodes each tile, the pixel shuffle folds each 2x2 patches into one
token (``downsample_ratio=0.5``: 1024 patches -> ``T = 256`` tokens per 448 px tile) and the
projector maps them; the prompt holds ``<img>`` + ``T * tiles`` image tokens + ``</img>`` per
image. A video is a run of frames, each a one-tile image in its own ``<img>...</img>`` (the
processor puts ``FrameN:`` before it): the model has no video input of its own.

What reduces where:

* After the projector, on the tokens the language model receives, tile by tile. An image is one
  contiguous run of image tokens in ``input_ids``: its length / ``T`` is the image's tile count.
* **tokencorr and quota never reduce the thumbnail.** It is the model's only view of the whole
  image (the local tiles each see a part), so every image keeps that global view whole, last, as
  the model was trained to see it; they reduce the local tiles. A one-tile image has no thumbnail
  and is reduced like a local tile; so is every video frame. (visionzip, cdpruner and the
  language-model methods treat the thumbnail like the other tiles, as their official code treats
  LLaVA-NeXT's base image: see below.)
* ``unit="crop"`` (tokencorr): each local tile is a crop. The tower's signals are per patch, the
  tokens per 2x2 patches: they are pooled to the shuffled grid with the model's own pixel shuffle
  run on patch indices (:func:`vitcompress.methods.tokencorr.pool_to_cells`: a token's [CLS]
  attention is the sum of its four patches', its key their four keys concatenated in the
  shuffle's channel order). q and k are tapped after InternViT's q/k norm (identity unless
  ``use_qk_norm``), which is what its attention multiplies. The thumbnail's tokens are in the
  layout as kept tokens (``-2``; tokencorr reports them as ``cls_tokens``).
* ``visionzip`` and ``cdpruner`` (crop methods that read the features the model projects): every
  tile, the thumbnail included (the official code reduces LLaVA-NeXT's base image, its global
  view, like the grid crops), keeps its budget of its ``T`` tokens, tile after tile. VisionZip's
  [CLS] attention and keys are pooled to the tokens as for tokencorr (layer -1 by default, the
  layer InternVL feeds its language model); the features it keeps and merges are the pixel-shuffled
  tokens the projector takes (tapped at the projector's input; [CLS] is dropped before the
  shuffle, so it is not among the tokens: ``dominant`` counts tokens only), projected after the
  merge as the official code projects CLIP's. CDPruner's kernel is on the tile's projected tokens,
  its relevance from ``scorer=`` on the tokens' features before the projector; ``clip=`` is refused
  (InternViT has no CLIP text tower).
* ``unit="video"`` (quota): the images of one sample are the frames of one video, each local
  tile a frame with its own token grid; a thumbnail stays whole after its image's tiles
  (``extra_tokens`` in the stats).
* ``fastv``, ``pyramiddrop`` and ``dart`` drop image tokens inside the language model (a Qwen2 /
  Llama-like decoder with 1-D rotary positions; :mod:`~vitcompress.runtimes.language_model`): the
  prompt is not rewritten and each kept token keeps its position. **Every image token is a
  candidate, the thumbnails' included**, as the official FastV ranks every image token of the
  prompt: the language model's own attention (or DART's duplication) decides, and the budget is
  the paper's fraction of all of them.
* ViT methods inside InternViT are refused: the pixel shuffle needs the full patch grid.

Requirements: transformers >= 5 (``forward(mm_encoder_outputs=...)``); the processor's layout
(each image's tokens one run, its thumbnail last).
"""
import functools
import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..runtimes.language_model import LanguageModelParts, LanguageModelRuntime
from ..runtimes.vlm import LlavaRuntime, TowerTaps
from .common import family_class, patch_vlm_prefill

Tensor = torch.Tensor

_CLASSES = {"transformers.models.internvl.modeling_internvl.InternVLForConditionalGeneration"}
#: the image modality a method of each unit reduces here (crops: local tiles; frames: a sample's tiles)
_UNITS = {"crop": "image", "video": "image"}


class InternVLAdapter:
    family = "transformers.InternVLForConditionalGeneration"
    description = "transformers InternVL models (InternVLForConditionalGeneration: InternVL2.5 / InternVL3 -hf)"
    targets = ("llava",)
    variant = "internvl"  # tokencorr reads the layer InternVL feeds the language model (the last)
    drawable = False  # vitcompress.visualize draws LLaVA's crops and frames, not tiles

    @staticmethod
    def matches(model) -> bool:
        return family_class(model, _CLASSES) is not None

    def __init__(self, model):
        import transformers

        if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
            raise TypeError(f"vitcompress's InternVL adapter needs transformers >= 5 (forward(mm_encoder_outputs=...) "
                            f"takes pre-encoded visual tokens); found transformers {transformers.__version__}. "
                            "Upgrade transformers.")
        self.model = model
        self.base = model.model
        self.config = model.config
        self.tower = self.base.vision_tower
        text = self.config.text_config
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (getattr(text, "pad_token_id", None) or 0)
        vc = self.config.vision_config
        self.tile_size = tuple(vc.image_size)
        patches = [s // p for s, p in zip(vc.image_size, vc.patch_size)]
        # Which patches each token of a tile is made of: the model's own pixel shuffle on patch indices.
        index = torch.arange(patches[0] * patches[1], dtype=torch.float64).reshape(1, *patches, 1)
        shuffled = self.base.pixel_shuffle(index, scale_factor=self.config.downsample_ratio)
        self.grid = tuple(shuffled.shape[1:3])  # the tile's token grid
        self.cells = shuffled.reshape(-1, shuffled.shape[-1]).long()  # [T, G]

    # ---------------------------------------------------------------- compress() hooks
    def make_runtime(self, spec, options, budget, common) -> LlavaRuntime:
        if spec.unit == "language_model":
            return LanguageModelRuntime(self, spec, options, budget, self.language_model_parts())
        if self.unit_modality(spec.unit) is None:
            raise TypeError(f"{spec.name} cannot reduce an InternVLForConditionalGeneration: it reduces "
                            f"{spec.unit or 'another unit'}s, and InternVL takes the methods that reduce image tiles "
                            "(unit 'crop': tokencorr, visionzip, cdpruner), the frames of a video (unit 'video': "
                            "quota) or the visual tokens inside the language model (fastv, pyramiddrop, dart); "
                            "vitcompress.supported(model) lists every method that fits")
        if getattr(spec, "reads_features", False) and options.get("clip") is not None:
            raise ValueError(f"{spec.name} clip= embeds the question with the CLIP text tower of the vision tower's "
                             "checkpoint; InternViT has none (no text tower shares its embedding space): pass "
                             "scorer=, a callable(token_features, question) -> cosine similarity per token")
        taps = self._tower_taps(spec, options) if spec.unit == "crop" else None
        return LlavaRuntime(self, spec, options, budget, taps=taps)

    def _layers(self):
        return getattr(getattr(self.tower, "encoder", None), "layer", None)

    def _tower_taps(self, spec, options) -> TowerTaps:
        """The tower's q/k (after its q/k norm) in the layers a crop method reads; InternViT's [CLS] needed."""
        layers = self._layers()
        if layers is None or getattr(getattr(self.tower, "embeddings", None), "cls_token", None) is None:
            raise TypeError(f"{spec.name} reads the [CLS] attention of the vision tower; this "
                            f"{type(self.tower).__name__} has no [CLS] token (supported: InternViT, "
                            "InternVLVisionModel); quota does not read the tower")
        feature = self._feature_layer(spec, len(layers)) if getattr(spec, "reads_features", False) else None
        chosen = spec.tower_layers(options, len(layers), feature)  # fails now for a layer the tower lacks
        if feature is not None:
            chosen = tuple(chosen) + (feature,)
        attention = [layers[i].attention for i in chosen]
        return TowerTaps([(i, a.num_heads, a.scale) for i, a in zip(chosen, attention)], cells=self.cells)

    def _feature_layer(self, spec, depth: int) -> int:
        """The encoder layer whose output InternVL shuffles and projects (``vision_feature_layer``: -1 the
        last layer's output, else an index into the hidden states, the embeddings first)."""
        selected = self.config.vision_feature_layer
        if not isinstance(selected, int) or not (selected == -1 or 1 <= selected % (depth + 1)):
            raise ValueError(f"{spec.name} reads the features of one encoder layer: vision_feature_layer must be "
                             f"an int naming a layer's output, got {selected!r}")
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(f"{spec.name} needs vision_feature_select_strategy='default' (patch tokens only), got "
                             f"{self.config.vision_feature_select_strategy!r}")
        return depth - 1 if selected == -1 else selected % (depth + 1) - 1

    def patch(self, runtime, patcher) -> None:
        patch_vlm_prefill(self.model, patcher)
        if runtime.taps is not None:
            layers = self._layers()
            for i in runtime.taps.hooked_layers():
                attn = layers[i].attention
                patcher.hook(attn.q_norm.register_forward_hook(runtime.taps.hook(i, "q")))
                patcher.hook(attn.k_norm.register_forward_hook(runtime.taps.hook(i, "k")))
            if getattr(runtime.method, "reads_features", False):  # the shuffled tokens the projector takes
                feature_layer = runtime.taps.layers[-1][0]
                hook = functools.partial(_record_input, runtime.taps.hook(feature_layer, "hidden"))
                patcher.hook(self.base.multi_modal_projector.register_forward_pre_hook(hook))
        if isinstance(runtime, LanguageModelRuntime):
            runtime.hook_language_model(patcher)

    # ---------------------------------------------------------------- model knowledge
    def language_model_parts(self) -> LanguageModelParts:
        """The Qwen2 / Llama-like decoder (its layers, output norm; 1-D rotary positions) and the image
        placeholder id: every image token of the prompt, the thumbnails' included, is a visual token."""
        lm = self.base.language_model
        return LanguageModelParts(module=lm, layers=lm.layers, final_norm=lm.norm,
                                  visual_token_ids=(self.config.image_token_id,))

    def modalities_in(self, inputs: Dict[str, Any]) -> List[str]:
        if inputs.get("pixel_values") is None:
            return []
        if inputs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixels or mm_encoder_outputs to a compressed InternVL, not both")
        return ["image"]

    def unit_modality(self, unit: str) -> Optional[str]:
        return _UNITS.get(unit)

    def token_id(self, modality: str) -> int:
        return self.config.image_token_id

    def tiles_per_image(self, inputs: Dict[str, Any], tokens_per_tile: int) -> List[int]:
        """Each image's tile count, from its run of image tokens in ``input_ids`` (row after row)."""
        runs = []
        for row in inputs["input_ids"] == self.config.image_token_id:
            edges = torch.cat([row.new_zeros(1), row, row.new_zeros(1)]).int().diff()
            runs += ((edges == -1).nonzero() - (edges == 1).nonzero()).flatten().tolist()
        tiles = inputs["pixel_values"].shape[0]
        if any(n % tokens_per_tile for n in runs) or sum(runs) != tiles * tokens_per_tile:
            raise ValueError(f"InternVL's image tokens in input_ids (runs of {runs}) do not match the {tiles} tiles of "
                             f"pixel_values ({tokens_per_tile} tokens each): each image needs its own run of "
                             "tokens_per_tile * tiles image tokens, as the processor writes them (<img>...</img>)")
        return [n // tokens_per_tile for n in runs]

    def encode(self, modality: str, inputs: Dict[str, Any]) -> List[Tensor]:
        """The model's own features, one ``[tiles * T, D]`` tensor per image."""
        fn = self.base.get_image_features
        kwargs = {k: inputs[k] for k in inspect.signature(fn).parameters if k != "kwargs" and inputs.get(k) is not None}
        features = fn(**kwargs, return_dict=True).pooler_output  # [tiles, T, D]
        per_image = self.tiles_per_image(inputs, features.shape[1])
        return [f.reshape(-1, f.shape[-1]) for f in features.split(per_image)]

    def split_units(self, modality: str, features: List[Tensor]) -> List[Tensor]:
        return list(features)

    def join_units(self, modality: str, units: List[Tensor], expansion: int = 1) -> Tensor:
        """One ``[L, D]`` per image -> the pooler_output the model scatters: ``[tokens, 1, D]``, one
        entry per token, so ``generate``'s expansion (num_beams / num_return_sequences), which repeats
        the entries of each row as a group, finds every row's boundary whatever each image kept."""
        return torch.cat(units)[:, None]

    def project(self, modality: str, hidden: Tensor) -> Tensor:
        """The model's projector on pixel-shuffled tower features ``[..., 4 C]``."""
        return self.base.multi_modal_projector(hidden)

    def with_features(self, inputs: Dict[str, Any], encoded: Dict[str, Any]) -> Dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = {k: v for k, v in inputs.items() if k != "pixel_values"}
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=encoded["image"])}
        return out

    def _check_tile_size(self, pixels: Tensor) -> None:
        if tuple(pixels.shape[-2:]) != self.tile_size:
            raise ValueError(f"InternVL tiles of {tuple(pixels.shape[-2:])} px; the tower's patch grid (and the token "
                             f"grid a method reads) is for its image_size {self.tile_size}")

    def crop_layouts(self, inputs) -> List[Tuple[Tensor, int]]:
        """Per image: each token's ``tile * T + token`` (``-2``: the thumbnail's, kept), and its tile count."""
        pixels = inputs["pixel_values"]
        self._check_tile_size(pixels)
        T = self.cells.shape[0]
        out = []
        for tiles in self.tiles_per_image(inputs, T):
            local = tiles - (tiles > 1)
            layout = torch.cat([torch.arange(local * T, device=pixels.device),
                                torch.full(((tiles - local) * T,), -2, dtype=torch.long, device=pixels.device)])
            out.append((layout, tiles))
        return out

    def video_units(self, modality: str, inputs, features: List[Tensor]):
        """Per image: its local tiles' pixels (the frames) and token grids, no head, and its thumbnail's tokens."""
        pixels = inputs["pixel_values"]
        self._check_tile_size(pixels)
        T = self.cells.shape[0]
        out, first = [], 0
        for f, tiles in zip(features, self.tiles_per_image(inputs, T)):
            local = tiles - (tiles > 1)
            grids = list(f[:local * T].reshape(local, *self.grid, -1))
            out.append((pixels[first:first + local], grids, f[:0], f[local * T:]))
            first += tiles
        return out


def _record_input(record, module, args) -> None:
    """A forward pre-hook handing a module's input to a tap's ``record(module, args, output)``."""
    record(module, args, args[0])
