"""transformers LLaVA family: ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNext``
(anyres crops), ``LlavaNextVideo`` and ``LlavaOnevision`` (images and videos).

The hook. A compressed model's ``forward`` (a forward pre-hook) and ``generate`` (a wrapper) see
every call first: when pixels come in
(the prefill), the wrapper encodes them with the model's own ``get_image_features`` /
``get_video_features``, lets the method reduce the visual tokens, and rewrites the prompt so that
each image / video has exactly as many placeholder tokens as it now has features: ``input_ids``,
``attention_mask`` and ``labels`` are rebuilt, rows that became shorter are padded (on the side the
batch was padded on; left otherwise) and ``position_ids`` are recomputed from the new mask when the
caller gave them or padding was added. The reduced features go to the model as
``mm_encoder_outputs``, so the model's own placeholder check and ``masked_scatter`` run unchanged,
and ``generate`` builds its KV cache, masks and positions from the rewritten prompt; decoding
steps carry no pixels and pass straight through. ``generate`` returns the caller's original prompt
followed by the generated tokens, so ``out[:, inputs["input_ids"].shape[1]:]`` still slices the
new tokens. A direct ``forward`` returns logits for the rewritten sequence (one position per
token the language model saw); :func:`vitcompress.stats` gives the token counts.

What reduces where:

* ``target="llava"`` methods reduce what they are defined on; a modality a method does not reduce
  is encoded by the model and passed on unchanged. Token-level methods (``unit="crop"``,
  tokencorr) reduce each image crop from signals of the vision tower -- LLaVA-1.5 images and
  LLaVA-NeXT / NeXT-Video anyres crops (kept in the model's unpadded, newline-separated layout: a
  row's newline token stays when a token of its row does). Frame-assignment methods
  (``unit="video"``, QuoTA) reduce the frames of each video of NeXT-Video and OneVision, or the
  images of one sample of LLaVA-1.5 taken as the frames of a video.
* ``target="vit"`` methods (tome, pitome, zero_tprune) run inside the CLIP vision tower through
  the HF CLIP adapter, on LLaVA-1.5 (whose features are the selected hidden state minus CLS, any
  length): the placeholders follow the shorter tower output. The anyres and video variants need
  the full patch grid after the tower (unpadding, pooling), so they refuse ViT methods.

Requirements: transformers >= 5 (the ``mm_encoder_outputs`` argument of ``forward``); older
versions, which merged features inside ``forward`` (``_merge_input_ids_with_image_features``) or
had no way to hand pre-encoded features in, are refused with the version found. tokencorr needs a
vision tower with a [CLS] token (CLIP).
"""
import functools
import inspect
import math
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch

from vitcompress.methods.quota import assign_tokens
from vitcompress.methods.tokencorr import cls_attention, compress_tokens, tokencorr_plan

from vitcompress.runtime import Patcher, ViTRuntime

from .common import bind

Tensor = torch.Tensor

# Per class: anyres image packing, the modalities it takes, video pooler_output as one tensor
# (OneVision flattens it) or a list, and whether a CLIP-tower ViT method keeps the hook valid.
_FAMILIES = {
    "LlavaForConditionalGeneration": dict(anyres=False, modalities=("image",), video_tensor=False, vit=True,
                                          crop="image", video="image"),
    "LlavaNextForConditionalGeneration": dict(anyres=True, modalities=("image",), video_tensor=False, vit=False,
                                              crop="image", video=None),
    "LlavaNextVideoForConditionalGeneration": dict(anyres=True, modalities=("image", "video"), video_tensor=False,
                                                   vit=False, crop="image", video="video"),
    "LlavaOnevisionForConditionalGeneration": dict(anyres=True, modalities=("image", "video"), video_tensor=True,
                                                   vit=False, crop=None, video="video"),
}
_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


def _family_of(model) -> Optional[str]:
    if "transformers" not in sys.modules:  # a transformers model cannot exist without it
        return None
    import transformers

    for name in _FAMILIES:
        cls = getattr(transformers, name, None)
        if cls is not None and isinstance(model, cls):
            return name
    return None


def _tower_layers(tower):
    inner = getattr(tower, "vision_model", tower)  # transformers 4.x wraps CLIPVisionTransformer
    encoder = getattr(inner, "encoder", None)
    return inner, getattr(encoder, "layers", None)


def _pooler(output):
    return output.pooler_output


class _TowerTap:
    """Forward hooks on the q/k projections of some encoder layers of the tower, for one call."""

    def __init__(self, layers, indices):
        self.layers, self.indices = layers, sorted(set(indices))
        self.q: Dict[int, Tensor] = {}
        self.k: Dict[int, Tensor] = {}
        self._handles = []

    def __enter__(self):
        for i in self.indices:
            attn = self.layers[i].self_attn
            self._handles.append(attn.q_proj.register_forward_hook(self._store(self.q, i)))
            self._handles.append(attn.k_proj.register_forward_hook(self._store(self.k, i)))
        return self

    @staticmethod
    def _store(where, i):
        def hook(module, args, output):
            where[i] = output.detach()
        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


class LlavaRuntime:
    """What ``compress`` attaches to a LLaVA model: the method, its options and budget, the hook
    (:meth:`prepare`) and what the last prefill did to each image / video."""

    def __init__(self, adapter, method, options: Dict[str, Any], budget, tower=None, tower_adapter=None):
        self.adapter = adapter
        self.method = method
        self.options = options
        self.budget = budget
        self.tower = tower  # a ViT method: the tower's Compression runtime and its HF CLIP adapter
        self.tower_adapter = tower_adapter
        self.patcher = Patcher()
        self.units: Dict[str, List[Dict[str, Any]]] = {}

    # ---------------------------------------------------------------- the hook
    def prepare(self, inputs: Dict[str, Any], question=None) -> Dict[str, Any]:
        """The keyword arguments of one ``forward`` / ``generate`` call with the visual tokens
        reduced and the placeholders rewritten; unchanged when there are no pixels."""
        fam = _FAMILIES[self.adapter.family_name]
        present = [m for m in fam["modalities"] if inputs.get(_PIXELS[m]) is not None]
        if not present:
            return inputs
        if inputs.get("input_ids") is None:
            raise ValueError("a compressed LLaVA needs input_ids (not inputs_embeds) with its pixels: the "
                             "image/video placeholders in input_ids are rewritten to the reduced token count")
        if inputs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixels or mm_encoder_outputs to a compressed LLaVA, not both")
        inputs = dict(inputs)
        input_ids = inputs["input_ids"]
        encoded, counts = {}, {}
        self.units = {}
        for modality in present:
            token_id = self.adapter.token_id(modality)
            features, old, new, stats = self._encode(modality, inputs, input_ids, token_id, question)
            encoded[modality] = features
            counts[token_id] = (modality, old, new)
            self.units[modality] = stats
            del inputs[_PIXELS[modality]]
        inputs.update(_rewrite_prompt(input_ids, inputs.get("attention_mask"), inputs.get("labels"),
                                      inputs.get("position_ids"), counts, self.adapter.pad_token_id))
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs["mm_encoder_outputs"] = {m: BaseModelOutputWithPooling(pooler_output=f) for m, f in encoded.items()}
        return inputs

    def _encode(self, modality, inputs, input_ids, token_id, question):
        """-> (pooler_output in the model's format, tokens per unit before and after, per-unit stats)."""
        fam = _FAMILIES[self.adapter.family_name]
        unit = getattr(self.method, "unit", None)
        if unit == "crop" and fam["crop"] == modality:
            return self._encode_crops(modality, inputs)
        encoded = self.adapter.encode(modality, inputs)
        if unit == "video" and fam["video"] == modality:
            return self._encode_videos(modality, inputs, input_ids, token_id, encoded, question)
        units = self.adapter.split_units(modality, _pooler(encoded))
        new = [u.shape[0] for u in units]
        old = self.adapter.uncompressed_counts(modality, inputs, new) if self.tower is not None else new
        stats = [{"tokens_before": o, "tokens_after": n} for o, n in zip(old, new)]
        return _pooler(encoded), old, new, stats

    def _encode_crops(self, modality, inputs):
        adapter, opts = self.adapter, self.options
        key_l, deep_l, shallow_l = self.method.tower_layers(opts, len(adapter.tower_layers))
        with _TowerTap(adapter.tower_layers, (key_l, deep_l, shallow_l)) as tap:
            encoded = adapter.encode(modality, inputs)
        heads = adapter.tower_layers[key_l].self_attn.num_heads
        with torch.no_grad():
            keys = tap.k[key_l]
            keys = keys.reshape(*keys.shape[:2], heads, -1).mean(dim=2)[:, 1:]  # [crops, N, d], CLS dropped
            deep = cls_attention(tap.q[deep_l], tap.k[deep_l], heads, adapter.tower_layers[deep_l].self_attn.scale)
            shallow = cls_attention(tap.q[shallow_l], tap.k[shallow_l], heads,
                                    adapter.tower_layers[shallow_l].self_attn.scale)
        generator = functools.partial(self.method.generator, opts, keys.device)
        packed = adapter.split_units(modality, _pooler(encoded))
        out, old, new, stats = [], [], [], []
        crop0 = 0
        for features, (layout, n_crops) in zip(packed, adapter.crop_layouts(inputs, keys.shape[1])):
            sl = slice(crop0, crop0 + n_crops)
            reduced, info = _reduce_crops(features, layout, keys[sl], deep[sl], shallow[sl], opts, generator)
            crop0 += n_crops
            out.append(reduced)
            old.append(features.shape[0])
            new.append(reduced.shape[0])
            stats.append(dict(info, tokens_before=features.shape[0], tokens_after=reduced.shape[0]))
        return adapter.join_units(modality, out), old, new, stats

    def _encode_videos(self, modality, inputs, input_ids, token_id, encoded, question):
        """QuoTA-style methods: one budget per video, split across its frames. LLaVA-1.5 takes the
        images of one sample as the frames of one video (each image keeps its own placeholders)."""
        units = self.adapter.video_units(modality, inputs, _pooler(encoded))  # (frames, grids, head, tail)
        old = [sum(g.shape[0] * g.shape[1] for g in grids) + head.shape[0] + tail.shape[0]
               for _, grids, head, tail in units]
        rows = _unit_rows(input_ids, token_id, old, modality)
        questions = _questions(question, input_ids.shape[0])
        if modality == "image":  # LLaVA-1.5: the images of a sample are the frames of one video
            members = [[u for u, r in enumerate(rows) if r == b] for b in sorted(set(rows))]
        else:
            members = [[u] for u in range(len(units))]
        tokens_of, stats = [None] * len(units), [None] * len(units)
        for group in members:
            frames = torch.cat([units[u][0] for u in group])
            grids = [g for u in group for g in units[u][1]]
            total = sum(g.shape[0] * g.shape[1] for g in grids)
            budget = self.method.budget_for(self.budget.value, total)
            probs = self.method.frame_probabilities(self.options, frames, questions[rows[group[0]]])
            tokens, alloc, shapes = assign_tokens(grids, probs, budget)
            video = {"budget": budget, "probabilities": probs, "allocation": alloc, "grid": shapes,
                     "frame_tokens": [h * w for h, w in shapes]}
            first = 0
            for u in group:
                _, grids_u, head, tail = units[u]
                span = slice(first, first + len(grids_u))
                first += len(grids_u)
                tokens_of[u] = torch.cat([head] + tokens[span] + [tail])
                stats[u] = dict(video, tokens_before=old[u], tokens_after=tokens_of[u].shape[0],
                                extra_tokens=head.shape[0] + tail.shape[0], frames=list(range(span.start, span.stop)))
        new = [t.shape[0] for t in tokens_of]
        return self.adapter.join_units(modality, tokens_of), old, new, stats

    # ---------------------------------------------------------------- reporting
    def stats(self) -> Dict[str, Any]:
        out = {
            "method": self.method.name,
            "family": self.adapter.family,
            "budget": "content-dependent" if self.budget.value is None else self.budget.describe(),
            "options": {k: (v if v is None or isinstance(v, (int, float, str, bool, tuple, list))
                            else type(v).__name__) for k, v in self.options.items()},
        }
        for modality, units in self.units.items():
            out[modality] = units
        out["visual_tokens_before"] = sum(u["tokens_before"] for us in self.units.values() for u in us)
        out["visual_tokens_after"] = sum(u["tokens_after"] for us in self.units.values() for u in us)
        if self.tower is not None:
            out["tower"] = self.tower.stats()
        return out


def _reduce_crops(features, layout, keys, deep, shallow, opts, generator):
    """One image: ``features[L, D]`` in the model's packed order, ``layout[L]`` naming each packed
    token (``crop * N + patch``; -1 a row's newline; -2 CLS, kept) -> reduced features, stats.
    ``generator(crop)`` gives each crop's sampling generator."""
    N = keys.shape[1]
    keep = layout == -2
    out = features.clone()
    crops = []
    for crop in range(keys.shape[0]):
        pos = ((layout >= 0) & (layout // N == crop)).nonzero().flatten()
        if pos.numel() == 0:
            continue
        patch = layout[pos] % N
        with torch.no_grad():
            plan, budget = tokencorr_plan(keys[crop, patch], deep[crop, patch], shallow[crop, patch],
                                          tau=opts["tau"], c=opts["c"], merge=opts["merge"], generator=generator(crop))
        kept = pos[plan.keep[0]]
        out[kept] = compress_tokens(features[pos], plan, deep[crop, patch]).to(out.dtype)
        keep[kept] = True
        crops.append({"patches": int(pos.numel()), "budget": budget, "density": budget / pos.numel()})
    newline = layout == -1
    if bool(newline.any()):
        # A newline ends its row of the anyres grid; it stays when a grid token of its row does.
        grid = layout >= 0
        if keys.shape[0] > 1:
            grid &= layout >= N  # the base crop precedes the grid and has no newlines
        row = torch.cumsum(newline.long(), 0) - newline.long()
        kept_in_row = torch.zeros(int(row.max()) + 1, dtype=torch.long, device=layout.device)
        kept_in_row.index_add_(0, row[grid & keep], torch.ones_like(row[grid & keep]))
        keep |= newline & (kept_in_row[row] > 0)
    return out[keep], {"crops": crops, "budget": sum(c["budget"] for c in crops),
                       "newline_tokens": int((newline & keep).sum()), "cls_tokens": int((layout == -2).sum())}


def _questions(question, batch: int) -> List[str]:
    if question is None:
        raise ValueError("quota needs the question: pass it with the call, e.g. model.generate(**inputs, "
                         "question=\"What is the man holding?\") (a string, or one string per sample)")
    if isinstance(question, str):
        return [question] * batch
    question = list(question)
    if len(question) != batch or not all(isinstance(q, str) for q in question):
        raise ValueError(f"question= must be a string or {batch} strings (one per sample), got {question!r}")
    return question


def _unit_rows(input_ids: Tensor, token_id: int, counts: List[int], modality: str) -> List[int]:
    """The batch row each image / video belongs to, from its placeholder count (in order)."""
    per_row = (input_ids == token_id).sum(dim=1).tolist()
    rows, unit = [], 0
    for b, n in enumerate(per_row):
        while n > 0 and unit < len(counts):
            if counts[unit] > n:
                break
            n -= counts[unit]
            rows.append(b)
            unit += 1
        if n != 0:
            break
    if unit != len(counts) or sum(per_row) != sum(counts):
        raise ValueError(f"{modality} placeholders in input_ids ({per_row} per sample) do not match the "
                         f"{len(counts)} {modality}(s) given ({counts} tokens each): each {modality} needs its "
                         "full run of placeholders in one sample, as the model's processor writes them")
    return rows


def _rewrite_prompt(input_ids, attention_mask, labels, position_ids, counts, pad_id) -> Dict[str, Any]:
    """Replace each unit's run of placeholders by as many as it now has tokens; pad the rows back
    to one length and rebuild the mask, labels and (when needed) the position ids."""
    B = input_ids.shape[0]
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    rows = [[input_ids[b], mask[b], labels[b] if labels is not None else None] for b in range(B)]
    for token_id, (modality, old, new) in counts.items():
        unit_rows = _unit_rows(torch.nn.utils.rnn.pad_sequence([r[0] for r in rows], batch_first=True,
                                                               padding_value=-1),
                               token_id, old, modality)
        for b in range(B):
            units = [u for u, r in enumerate(unit_rows) if r == b]
            if not units:
                continue
            pos = (rows[b][0] == token_id).nonzero().flatten()
            repeat = torch.ones_like(rows[b][0])
            start = 0
            for u in units:
                repeat[pos[start:start + old[u]]] = 0
                repeat[pos[start]] = new[u]
                start += old[u]
            rows[b] = [t.repeat_interleave(repeat) if t is not None else None for t in rows[b]]
    lengths = [r[0].shape[0] for r in rows]
    longest = max(lengths)
    right = attention_mask is not None and bool((attention_mask[:, -1] == 0).any())

    def pad(t, value):
        fill = t.new_full((longest - t.shape[0],), value)
        return torch.cat([t, fill] if right else [fill, t])

    out = {"input_ids": torch.stack([pad(r[0], pad_id) for r in rows])}
    padded = any(n != longest for n in lengths)
    new_mask = torch.stack([pad(r[1], 0) for r in rows])
    if attention_mask is not None or padded:
        out["attention_mask"] = new_mask
    if labels is not None:
        out["labels"] = torch.stack([pad(r[2], -100) for r in rows])
    if position_ids is not None or padded:
        out["position_ids"] = (new_mask.long().cumsum(-1) - 1).clamp_min(0)
    return out


def _named_arguments(function, model, args, kwargs) -> Dict[str, Any]:
    """The call ``function(model, *args, **kwargs)``'s arguments by name (``**kwargs`` flattened)."""
    signature = inspect.signature(function)
    arguments = dict(signature.bind(model, *args, **kwargs).arguments)
    params = list(signature.parameters.values())
    arguments.pop(params[0].name)  # self
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(p.name, {}))
    return arguments


def _prefill_hook(model, args, kwargs):
    """Forward pre-hook: the call's arguments with the visual tokens reduced at prefill (see the
    module docstring). A hook rather than a new ``forward`` keeps the model's forward signature,
    which ``generate`` validates its keyword arguments against."""
    question = kwargs.pop("question", None)
    return (), model._vitcompress.prepare(_named_arguments(type(model).forward, model, args, kwargs), question)


def _compressed_generate(model, *args, **kwargs):
    """``generate`` on the rewritten prompt; returns the caller's prompt + the generated tokens."""
    question = kwargs.pop("question", None)
    kwargs = _named_arguments(type(model).generate, model, args, kwargs)  # positional ones too
    inputs = kwargs.pop("inputs", None)
    if inputs is not None:
        if kwargs.get("input_ids") is not None:
            raise ValueError("give the prompt either as the first argument or as input_ids=, not both")
        kwargs["input_ids"] = inputs
    original = kwargs.get("input_ids")
    config = kwargs.get("generation_config") or model.generation_config
    adapter = model._vitcompress.adapter
    adapter.expansion = max(kwargs.get("num_beams") or config.num_beams or 1, 1) * max(
        kwargs.get("num_return_sequences") or config.num_return_sequences or 1, 1)
    try:
        prepared = model._vitcompress.prepare(kwargs, question)
    finally:
        adapter.expansion = 1
    out = type(model).generate(model, **prepared)
    if prepared is kwargs or original is None:
        return out
    sequences = out if isinstance(out, Tensor) else out.sequences
    start = prepared["input_ids"].shape[1]
    prompt = original.repeat_interleave(sequences.shape[0] // original.shape[0], dim=0).to(sequences.device)
    sequences = torch.cat([prompt, sequences[:, start:]], dim=1)
    if isinstance(out, Tensor):
        return sequences
    out.sequences = sequences
    return out


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

    # ---------------------------------------------------------------- compress() hooks
    def make_runtime(self, spec, options, budget):
        fam = _FAMILIES[self.family_name]
        if spec.target == "vit":
            return self._vit_runtime(spec, options, budget)
        unit = getattr(spec, "unit", None)
        supported = [n for n, f in _FAMILIES.items() if f.get(unit)]
        if not fam.get(unit):
            raise TypeError(f"{spec.name} cannot reduce a {self.family_name}: it reduces "
                            f"{'image crops' if unit == 'crop' else 'the frames of a video'}; supported: "
                            f"{', '.join(supported)}")
        if spec.default_budget.get("keep", 0) is None:  # the content sets the budget
            if budget.value is not None:
                raise ValueError(f"{spec.name} sets each crop's budget from its content (ceil(rho * N)); it takes "
                                 f"no keep=/r=/flops= (got {budget.describe()}); tune it with tau= and c=")
        elif budget.kind != "keep":
            raise ValueError(f"{spec.name} takes keep= (the fraction of each video's visual tokens it may "
                             f"keep), not {budget.kind}=")
        if unit == "crop":
            self._check_crop_tower(spec, options)
        return LlavaRuntime(self, spec, options, budget)

    def _check_crop_tower(self, spec, options) -> None:
        inner = self.tower_inner
        if self.tower_layers is None or not hasattr(getattr(inner, "embeddings", None), "class_embedding"):
            raise TypeError(f"{spec.name} reads the [CLS] attention of the vision tower; this "
                            f"{type(self.tower).__name__} has no [CLS] token (supported: CLIP vision towers)")
        spec.tower_layers(options, len(self.tower_layers))  # fail now for a layer the tower lacks
        strategy = self.config.vision_feature_select_strategy
        if _FAMILIES[self.family_name]["anyres"] and strategy != "default":
            raise ValueError(f"{spec.name} on anyres crops needs vision_feature_select_strategy='default' "
                             f"(got {strategy!r})")

    def _vit_runtime(self, spec, options, budget):
        if not _FAMILIES[self.family_name]["vit"]:
            raise TypeError(f"ViT method {spec.name!r} inside the tower is supported on LlavaForConditionalGeneration "
                            f"only: {self.family_name} needs the full patch grid after the tower (anyres "
                            "unpadding, video pooling); use tokencorr or quota on it")
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError("a ViT method inside the tower needs one vision_feature_layer (an int): hidden "
                             "states of different layers have different token counts once tokens are reduced")
        try:
            from .hf_clip import HFCLIPVisionAdapter
        except ImportError as e:
            raise TypeError(f"ViT methods inside LLaVA's tower need the HF CLIP adapter ({e})") from None
        if not HFCLIPVisionAdapter.matches(self.tower):
            raise TypeError(f"ViT methods inside LLaVA's tower need a CLIP vision tower, got {type(self.tower).__name__}")
        tower_adapter = HFCLIPVisionAdapter(self.tower)
        return LlavaRuntime(self, spec, options, budget, tower=ViTRuntime(tower_adapter, spec, options, budget),
                            tower_adapter=tower_adapter)

    def patch(self, runtime, patcher) -> None:
        # Module-level functions only (a hook, common.bind), so deepcopy / pickle of a compressed
        # model stay self-contained; the hook dicts are replaced, not edited, so restore is exact.
        model = self.model
        patcher.set(model, "_forward_pre_hooks", OrderedDict(model._forward_pre_hooks, vitcompress=_prefill_hook))
        patcher.set(model, "_forward_pre_hooks_with_kwargs",
                    OrderedDict(model._forward_pre_hooks_with_kwargs, vitcompress=True))
        patcher.set(model, "generate", bind(_compressed_generate, model))
        if runtime.tower is not None:
            runtime.tower_adapter.patch(runtime.tower, patcher)

    # ---------------------------------------------------------------- model knowledge
    def token_id(self, modality: str) -> int:
        return getattr(self.config, f"{modality}_token_id")

    def encode(self, modality: str, inputs: Dict[str, Any]):
        """The model's own encoder for ``modality`` on the call's arguments."""
        fn = getattr(self.base, f"get_{modality}_features")
        params = inspect.signature(fn).parameters
        kwargs = {k: inputs[k] for k in params if k != "kwargs" and inputs.get(k) is not None}
        return fn(**kwargs, return_dict=True)

    def split_units(self, modality: str, pooled) -> List[Tensor]:
        """pooler_output -> one ``[L, D]`` tensor per image / video."""
        if isinstance(pooled, Tensor):
            return list(pooled) if pooled.dim() == 3 else [pooled]
        return [p.reshape(-1, p.shape[-1]) for p in pooled]

    expansion = 1  # rows generate() makes of each sample (beams x returned sequences), set per call

    def join_units(self, modality: str, units: List[Tensor]):
        if modality == "video" and _FAMILIES[self.family_name]["video_tensor"]:
            if len({u.shape[0] for u in units}) == 1:
                return torch.stack(units)
            if self.expansion > 1:
                # transformers would repeat the joined tensor as a whole (A B A B for rows A A B B):
                # wrong features without an error
                raise ValueError(f"{self.family_name}: the videos of this batch kept different numbers of tokens, "
                                 "which generate() cannot expand for num_beams / num_return_sequences > 1; "
                                 "generate one video per call, or with num_beams=1 and num_return_sequences=1")
            return torch.cat(units)[None]  # the model flattens (batch, tokens) anyway
        return units

    def uncompressed_counts(self, modality: str, inputs, reduced: List[int]) -> List[int]:
        """Tokens per image of the uncompressed model (LLaVA-1.5 with a ViT method in the tower)."""
        vc = self.config.vision_config
        grid = (vc.image_size // vc.patch_size) ** 2
        return [grid + (self.config.vision_feature_select_strategy == "full")] * len(reduced)

    def crop_layouts(self, inputs, num_patches: int) -> List[Tuple[Tensor, int]]:
        """Per image: which crop/patch each token of the packed features is (see _reduce_crops), and
        how many crops the image has."""
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
        index = [torch.arange(n * num_patches, dtype=torch.float64, device=device).reshape(n, num_patches, 1)
                 for n in crops]
        newline = torch.full((1,), -1.0, dtype=torch.float64, device=device)
        packed, _ = self.base.pack_image_features(index, sizes, vision_feature_select_strategy="default",
                                                  image_newline=newline)
        return [(p.reshape(-1).long(), n) for p, n in zip(packed, crops)]

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
