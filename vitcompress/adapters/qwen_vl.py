"""transformers Qwen-VL family: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``
and ``Qwen3VLForConditionalGeneration``, through the same VLM runtime as LLaVA
(:class:`~vitcompress.runtimes.vlm.LlavaRuntime`).

What reduces where. The visual tokens are the vision tower's merger output (each token ``merge x merge``
patches), ``t * h * w / merge**2`` per image (``image_grid_thw``) or video (``video_grid_thw``):

* ``tokencorr`` reduces each image (one crop: Qwen has no anyres tiling) from the tower's q/k.
  The tower has no [CLS] token, so the [CLS] attention the method reads is replaced by the
  **attention each patch receives, averaged over all queries of its image and over the heads**
  (the column mean of the softmax attention), computed from the layer's own q and k with their
  rotary positions, over the whole image (Qwen2.5-VL's windowed layers included). Why: it is, like
  the [CLS] row, one distribution over the patches (it sums to 1), and it measures how much the
  image as a whole attends to a patch -- what the [CLS] row measures in CLIP -- without a learned
  query the tower does not have. A merged token receives the sum over its patches. Its key (for
  the redundancy test) is its patches' keys (averaged over heads, before the rotary positions, so
  that equal content at two places counts as equal) concatenated in the merger's order, as the
  merger concatenates their features.
* ``visionzip`` and ``cdpruner`` (no official Qwen-VL code: the official LLaVA rules on this tower's
  pieces) reduce each image: VisionZip's dominant tokens by the received attention above (the layer
  ``layer=``; ``-1`` is the one the merger reads), its keys above, and the merger's input as the
  features it merges before the merger (:class:`~vitcompress.interfaces.TokenFeatures`, ``project`` =
  the merger); CDPruner's similarity on the merger's output, its relevance from ``scorer=``. Each
  token keeps its own M-RoPE position (a contextual token its target's: the report's ``sources``).
* ``quota`` reduces each video: its frame groups (one per ``temporal_patch_size`` frames, a
  token grid ``h/merge x w/merge`` each) share the video's budget. The scorer sees each group's
  first frame, rebuilt from the processor's patches (normalised with CLIP's mean and std, as
  Qwen's processors do). A resized grid's token takes the position of the original token its
  centre falls in.
* ``fastv``, ``pyramiddrop`` and ``dart`` drop image and video tokens inside the language model
  (:mod:`~vitcompress.runtimes.language_model`): the prompt is not rewritten, each kept token keeps
  its rotary position and the text row of its 3-D position, and the model's own prefill sets
  ``rope_deltas``, so decoding continues at the uncompressed positions. Qwen3-VL: a drop layer must
  come after the layers that receive DeepStack features (they are added at the full prompt's visual
  positions).
* Images pass unchanged under quota, videos under tokencorr, visionzip and cdpruner; ViT methods inside the tower and
  any other method are refused with the methods that can run.

Positions (M-RoPE). The 3-D ``position_ids`` of the full prompt are computed first, from the
caller's ``input_ids`` and grids by the model's own ``get_rope_index`` (or taken from the call's
``position_ids``); the rewritten prompt takes each token's column from them
(:func:`~vitcompress.runtimes.prompt.rewrite_prompt` with ``sources``): a kept token keeps its
position and the text after the images keeps its positions as in the uncompressed model. The
model's cached ``rope_deltas`` are set for the rewritten prompt so that decoding steps (``generate``
or a forward with the cache and no ``position_ids``) continue where the uncompressed model would.
Qwen3-VL's DeepStack features are reduced with the visual tokens (each kept token's, merged or
resized alike), as each is added to its token in the early layers of the language model.

Requirements: transformers >= 5 (``mm_encoder_outputs``, ``mm_token_type_ids``).
"""
import functools
import inspect
from typing import Any, Dict, List, Optional

import torch

from ..interfaces import TokenFeatures, TokenSignals
from ..runtimes.language_model import LanguageModelParts, LanguageModelRuntime
from ..runtimes.vlm import LlavaRuntime, TowerTaps
from .common import family_class, patch_vlm_prefill

Tensor = torch.Tensor

# Per class: its transformers package, whether the tower reorders patches into attention windows
# (Qwen2.5-VL) and whether it hands DeepStack features to the language model (Qwen3-VL).
_VERSIONS = {
    "Qwen2VLForConditionalGeneration": dict(package="qwen2_vl", windows=False, deepstack=False),
    "Qwen2_5_VLForConditionalGeneration": dict(package="qwen2_5_vl", windows=True, deepstack=False),
    "Qwen3VLForConditionalGeneration": dict(package="qwen3_vl", windows=False, deepstack=True),
}
_CLASSES = {f"transformers.models.{v['package']}.modeling_{v['package']}.{name}": name for name, v in _VERSIONS.items()}
#: the modality a method of each unit reduces on Qwen-VL, and the methods of that unit
_UNITS = {"crop": "image", "video": "video"}
_CAN_RUN = ("tokencorr, visionzip, cdpruner (each image, from the vision tower), quota (the frame groups of each "
            "video) and fastv, pyramiddrop, dart (image and video tokens, inside the language model)")
_PIXELS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
_QUERY_CHUNK = 1024  # queries per block of the attention a patch receives


def _version_of(model) -> Optional[str]:
    name = family_class(model, _CLASSES)
    return None if name is None else _CLASSES[name]


# --------------------------------------------------------------------------- the tower's signals for tokencorr


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def received_attention(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``q, k [N, H, d]`` -> ``[N]``: the softmax attention each token receives, averaged over all
    N queries and the H heads (queries in blocks: no ``N x N`` matrix per head is kept)."""
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # [H, N, d]
    total = q.new_zeros(k.shape[1])
    for block in q.split(_QUERY_CHUNK, dim=1):
        total += (block @ k.transpose(1, 2) * scale).softmax(dim=-1).sum(dim=(0, 1))
    return total / (q.shape[0] * q.shape[1])


def token_signals(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, scale: float, patches: List[int],
                  unit: int) -> TokenSignals:
    """One tower layer's ``qkv`` output ``[P, 3 * C]`` and rotary ``cos, sin [P, d]`` (patches in image
    order, each image's ``unit`` patches of a merged token together) -> per image (``patches`` each),
    its merged tokens' keys and received attention, zero-padded to the longest image."""
    q, k, _ = qkv.reshape(qkv.shape[0], 3, num_heads, -1).unbind(1)  # [P, H, d]
    cos, sin = cos[:, None].float(), sin[:, None].float()
    q_rot = q.float() * cos + _rotate_half(q.float()) * sin
    k_rot = k.float() * cos + _rotate_half(k.float()) * sin
    keys, attention = [], []
    for qi, ki, raw in zip(q_rot.split(patches), k_rot.split(patches), k.split(patches)):
        attention.append(received_attention(qi, ki, scale).reshape(-1, unit).sum(dim=-1))
        keys.append(raw.float().mean(dim=1).reshape(-1, unit * raw.shape[-1]))
    return TokenSignals(keys=torch.nn.utils.rnn.pad_sequence(keys, batch_first=True),
                        attention=torch.nn.utils.rnn.pad_sequence(attention, batch_first=True))


class QwenTowerTaps(TowerTaps):
    """What a crop method reads from a Qwen-VL tower, captured while this thread encodes images:
    per tapped layer its ``qkv`` output and rotary ``(cos, sin)``, and the tower's ``grid_thw``; turned
    into :class:`~vitcompress.interfaces.TokenSignals` per image (the module docstring says what)."""

    def __init__(self, layers, merge: int, windows: Optional[Dict[str, int]] = None, features: bool = False):
        super().__init__(layers)
        self.merge = merge
        self.windows = windows  # Qwen2.5-VL: window_size, patch_size (the tower's patch order)
        self.features = features  # also the merger's input, as TokenFeatures after the signals

    def rope_hook(self, layer: int):
        return functools.partial(self._record_rope, layer)

    def _record_rope(self, layer: int, module, args, kwargs) -> None:
        captured = self._captured.get()
        if captured is not None:
            captured[layer, "rope"] = kwargs["position_embeddings"]

    def grid_hook(self):
        return functools.partial(self._record_grid)

    def _record_grid(self, module, args, kwargs) -> None:
        captured = self._captured.get()
        if captured is not None:
            captured["grid"] = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

    def merger_hook(self):
        return functools.partial(self._record_merger_input)

    def _record_merger_input(self, module, args) -> None:
        captured = self._captured.get()
        if captured is not None:
            captured["merger"] = args[0].detach()

    def run(self, encode):
        captured: Dict[Any, Any] = {}
        self._captured.set(captured)
        try:
            result = encode()
        finally:
            self._captured.set(None)
        missing = [layer for layer in self.hooked_layers() if (layer, "qkv") not in captured]
        if missing or "grid" not in captured or (self.features and "merger" not in captured):
            raise RuntimeError(f"the vision tower did not run its layers {missing} while encoding")
        grid = captured["grid"]
        unit = self.merge ** 2
        order = self._image_order(grid, unit)
        patches = grid.prod(-1).tolist()
        signals = []
        for layer, heads, scale in self.layers:
            cos, sin = captured[layer, "rope"]
            signals.append(token_signals(captured[layer, "qkv"][order], cos[order], sin[order], heads, scale,
                                         patches, unit))
        if self.features:
            hidden = captured["merger"][order]
            signals.append(TokenFeatures([h.reshape(-1, unit, h.shape[-1]) for h in hidden.split(patches)]))
        return result, signals

    def _image_order(self, grid: Tensor, unit: int) -> Tensor:
        """Where each patch of the images' own order is in the tower's order."""
        total = int(grid.prod(-1).sum())
        if self.windows is None:
            return torch.arange(total, device=grid.device)
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, spatial_merge_size=self.merge, **self.windows)
        tower = (window_index.to(grid.device)[:, None] * unit + torch.arange(unit, device=grid.device)).flatten()
        return torch.argsort(tower)


# --------------------------------------------------------------------------- the adapter


class QwenVLAdapter:
    family = "transformers.Qwen2VL/Qwen2_5_VL/Qwen3VL"
    description = ("transformers Qwen-VL models (Qwen2VL-, Qwen2_5_VL-, Qwen3VLForConditionalGeneration): "
                   "visual tokens after the merger")
    targets = ("llava",)
    variant = None

    @staticmethod
    def matches(model) -> bool:
        return _version_of(model) is not None

    def __init__(self, model):
        import transformers

        self.model = model
        self.version = _version_of(model)
        self.family = f"transformers.{self.version}"
        if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
            raise TypeError(f"vitcompress's Qwen-VL adapter needs transformers >= 5 (forward(mm_encoder_outputs=...) "
                            f"takes pre-encoded visual tokens); found transformers {transformers.__version__}")
        self.base = model.model
        self.visual = self.base.visual
        self.config = model.config
        vision = self.config.vision_config
        self.merge = vision.spatial_merge_size
        self.patch_size = vision.patch_size
        self.temporal_patch_size = vision.temporal_patch_size
        self.deepstack = _VERSIONS[self.version]["deepstack"]
        text = self.config.text_config
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (getattr(text, "pad_token_id", None) or 0)

    # ---------------------------------------------------------------- compress() hooks
    def make_runtime(self, spec, options, budget, common) -> LlavaRuntime:
        if spec.unit == "language_model":
            runtime = LanguageModelRuntime(self, spec, options, budget, self.language_model_parts())
            self._check_deepstack(spec, runtime.drop_layers)
            return runtime
        if spec.target != "llava" or self.unit_modality(spec.unit) is None:
            raise TypeError(f"{spec.name} cannot reduce a {self.version}: the methods that run on Qwen-VL are "
                            f"{_CAN_RUN}")
        taps = None
        if spec.unit == "crop":
            depth = len(self.visual.blocks)  # the merger reads the last block's output
            layers = spec.tower_layers(options, depth, depth - 1)  # fails now for a layer the tower lacks
            attention = [self.visual.blocks[i].attn for i in layers]
            windows = None
            if _VERSIONS[self.version]["windows"]:
                windows = dict(window_size=self.config.vision_config.window_size, patch_size=self.patch_size)
            taps = QwenTowerTaps([(i, a.num_heads, a.scaling) for i, a in zip(layers, attention)], self.merge, windows,
                                 features=getattr(spec, "reads_features", False))
        return LlavaRuntime(self, spec, options, budget, taps=taps)

    def patch(self, runtime, patcher) -> None:
        patch_vlm_prefill(self.model, patcher)
        taps = runtime.taps
        if taps is not None:
            patcher.hook(self.visual.register_forward_pre_hook(taps.grid_hook(), with_kwargs=True))
            for i in taps.hooked_layers():
                attn = self.visual.blocks[i].attn
                patcher.hook(attn.qkv.register_forward_hook(taps.hook(i, "qkv")))
                patcher.hook(attn.register_forward_pre_hook(taps.rope_hook(i), with_kwargs=True))
            if taps.features:
                patcher.hook(self.visual.merger.register_forward_pre_hook(taps.merger_hook()))
        if isinstance(runtime, LanguageModelRuntime):
            runtime.hook_language_model(patcher)

    # ---------------------------------------------------------------- model knowledge
    def language_model_parts(self) -> LanguageModelParts:
        """The Qwen2 / Qwen3 decoder (its layers, output norm) and the image and video placeholder ids.
        Its layers get per-token rotary ``position_embeddings`` (M-RoPE's sections already combined)
        and the text row of the 3-D positions as ``position_ids [B, T]``: both are sliced per token."""
        lm = self.base.language_model
        ids = tuple(self.token_id(m) for m in _PIXELS)
        return LanguageModelParts(module=lm, layers=lm.layers, final_norm=lm.norm, visual_token_ids=ids)

    def _check_deepstack(self, spec, drop_layers) -> None:
        """Qwen3-VL adds DeepStack features to the visual positions of the full prompt after each of
        its first layers: a drop before the last of them would leave those positions wrong."""
        if not self.deepstack:
            return
        stacked = len(self.config.vision_config.deepstack_visual_indexes)
        if drop_layers[0] < stacked:
            raise ValueError(f"{spec.name} drops visual tokens before language-model layer {drop_layers[0]}, but "
                             f"{self.version} adds DeepStack features to them after each of layers 0..{stacked - 1}: "
                             f"drop at layer {stacked} or later")

    def modalities_in(self, inputs: Dict[str, Any]) -> List[str]:
        present = [m for m, (pixels, _) in _PIXELS.items() if inputs.get(pixels) is not None]
        if present and inputs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixels or mm_encoder_outputs to a compressed Qwen-VL, not both")
        missing = [_PIXELS[m][1] for m in present if inputs.get(_PIXELS[m][1]) is None]
        if missing:
            raise ValueError(f"a compressed Qwen-VL needs {', '.join(missing)} with its pixels (as the processor "
                             "returns them)")
        return present

    def unit_modality(self, unit: str) -> Optional[str]:
        return _UNITS.get(unit)

    def token_id(self, modality: str) -> int:
        return getattr(self.config, f"{modality}_token_id")

    def encode(self, modality: str, inputs: Dict[str, Any]) -> List[Tensor]:
        """Per image / video ``[L, D]`` tokens of the merger (Qwen3-VL: with its DeepStack features
        after them along the channels, so that a method reduces them alike)."""
        pixels, grid = _PIXELS[modality]
        out = getattr(self.base, f"get_{modality}_features")(inputs[pixels], inputs[grid], return_dict=True)
        if not self.deepstack:
            return list(out.pooler_output)
        return [torch.cat(parts, dim=-1) for parts in zip(out.pooler_output, *out.deepstack_features)]

    def project(self, modality: str, hidden: Tensor) -> Tensor:
        """The merger on its input ``[n, merge**2, C]`` (each token's patches) -> ``[n, D]``, as the tower runs it."""
        return self.visual.merger(hidden.reshape(-1, hidden.shape[-1]))

    def split_units(self, modality: str, features: List[Tensor]) -> List[Tensor]:
        return list(features)

    def join_units(self, modality: str, units: List[Tensor], expansion: int = 1) -> List[Tensor]:
        return list(units)  # generate() repeats each sample's list itself

    def with_features(self, inputs: Dict[str, Any], encoded: Dict[str, List[Tensor]]) -> Dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = {k: v for k, v in inputs.items() if k not in {_PIXELS[m][0] for m in encoded}}
        outputs = {}
        width = self.config.text_config.hidden_size
        for modality, units in encoded.items():
            parts = [u.split(width, dim=-1) for u in units]
            pooled = tuple(p[0] for p in parts)
            if self.deepstack:
                deepstack = [tuple(p[i] for p in parts) for i in range(1, len(parts[0]))]
                outputs[modality] = _deepstack_output(self.version)(pooler_output=pooled, deepstack_features=deepstack)
            else:
                outputs[modality] = BaseModelOutputWithPooling(pooler_output=pooled)
        out["mm_encoder_outputs"] = outputs
        return out

    def crop_layouts(self, inputs) -> List[tuple]:
        """Every image is one crop: its merged tokens in order."""
        grid = inputs["image_grid_thw"]
        device = inputs["pixel_values"].device
        return [(torch.arange(int(n), device=device), 1) for n in grid.prod(-1) // self.merge ** 2]

    def video_units(self, modality: str, inputs, features: List[Tensor]):
        """Per video: one frame per frame group ``[t, 3, H, W]`` (rebuilt from the processor's patches),
        the groups' token grids ``[h, w, D]``, and no extra tokens."""
        pixels, grid_key = _PIXELS[modality]
        grids = inputs[grid_key].tolist()
        patches = inputs[pixels].split([t * h * w for t, h, w in grids])
        out = []
        for (t, h, w), flat, tokens in zip(grids, patches, features):
            frames = self._frames(flat, t, h, w)
            token_grids = list(tokens.reshape(t, h // self.merge, w // self.merge, -1))
            out.append((frames, token_grids, tokens[:0], tokens[:0]))
        return out

    def _frames(self, flat: Tensor, t: int, h: int, w: int) -> Tensor:
        """The processor's patches ``[t*h*w, C*T*p*p]`` -> the first frame of each group ``[t, C, h*p, w*p]``
        (the processor lays them out group, merge block row and column, row and column in the block,
        then channel, frame, pixel row and column)."""
        m, p, T = self.merge, self.patch_size, self.temporal_patch_size
        x = flat.reshape(t, h // m, w // m, m, m, -1, T, p, p)
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # t, T, C, h/m, m, p, w/m, m, p
        return x.reshape(t, T, x.shape[2], h * p, w * p)[:, 0]

    # ---------------------------------------------------------------- positions (M-RoPE)
    def prompt_columns(self, inputs: Dict[str, Any], units: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
        """What :func:`~vitcompress.runtimes.prompt.rewrite_prompt` needs to keep positions: the
        token each new token stands for, and the full prompt's 3-D positions and token types."""
        input_ids = inputs["input_ids"]
        types = inputs.get("mm_token_type_ids")
        if types is None:  # as the processor writes them: text 0, image 1, video 2
            types = (input_ids == self.token_id("image")).int() + 2 * (input_ids == self.token_id("video")).int()
        positions = inputs.get("position_ids")
        if positions is None or positions.dim() != 3:
            args = dict(inputs, mm_token_type_ids=types)
            wanted = inspect.signature(self.base.get_rope_index).parameters
            positions, _ = self.base.get_rope_index(**{k: args[k] for k in wanted if args.get(k) is not None})
        sources = {self.token_id(m): [token_sources(stat) for stat in stats] for m, stats in units.items()}
        return {"sources": sources, "columns": {"position_ids": (positions, 0), "mm_token_type_ids": (types, 0)}}

    def prefilled(self, prepared: Dict[str, Any]) -> None:
        """The model caches ``rope_deltas`` (position minus index of the next token, per row) for the
        steps after prefill: set them for the rewritten prompt, as its own prefill would."""
        positions, mask = prepared["position_ids"], prepared.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(prepared["input_ids"])
        mask = mask.bool()
        deltas = [positions[:, b][:, mask[b]].max() + 1 - mask[b].sum() for b in range(mask.shape[0])]
        self.base.rope_deltas = torch.stack(deltas)[:, None]


def _deepstack_output(version: str):
    """Qwen3-VL's encoder output class (features and DeepStack features), from its own module."""
    import sys

    package = _VERSIONS[version]["package"]
    return getattr(sys.modules[f"transformers.models.{package}.modeling_{package}"],
                   "BaseModelOutputWithDeepstackFeatures")


def token_sources(stat: Dict[str, Any]) -> Tensor:
    """Which of a unit's original tokens each of its reduced tokens stands for, from the unit's stats:
    unchanged units all of theirs; tokencorr (``crops``) the patches it kept, in order; QuoTA
    (``grid``) for each resized frame grid, the original token each new token's centre falls in."""
    if "sources" in stat:  # visionzip, cdpruner: each token's own (a contextual token's target's)
        return torch.tensor(stat["sources"], dtype=torch.long)
    if "crops" in stat:
        (crop,) = stat["crops"]  # Qwen-VL images are one crop each
        return torch.tensor(sorted(crop["kept"]), dtype=torch.long)
    if "grid" in stat:
        out, first = [], 0
        for frame, (h, w) in zip(stat["frames"], stat["frame_grids"]):
            rows, cols = stat["grid"][frame]
            i = ((torch.arange(rows) + 0.5) * h / rows).long().clamp(max=h - 1)
            j = ((torch.arange(cols) + 0.5) * w / cols).long().clamp(max=w - 1)
            out.append(first + (i[:, None] * w + j[None, :]).flatten())
            first += h * w
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
    if stat["tokens_after"] == stat["tokens_before"]:
        return torch.arange(stat["tokens_before"])
    raise ValueError("cannot tell which tokens this method kept, so not where they were in the prompt; the methods "
                     f"that run on Qwen-VL are {_CAN_RUN}")
