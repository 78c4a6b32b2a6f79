"""The runtime of a compressed LLaVA-like VLM: at prefill it encodes the call's pixels with the
model's own encoders, lets the method (a :class:`~vitcompress.interfaces.LlavaMethod`) reduce the
visual tokens, and rewrites the prompt (:mod:`vitcompress.runtimes.prompt`) so each image / video has as
many placeholders as it keeps tokens.

The adapter knows the model; what :class:`LlavaRuntime` asks of it:

* ``family``, ``pad_token_id``, ``token_id(modality)`` (the placeholder);
* ``modalities_in(inputs)``: the modalities whose pixels a call carries;
  ``unit_modality(unit)``: the modality a method of that unit reduces on this model, or None;
* ``encode(modality, inputs)``: the model's features; ``split_units(modality, features)`` ->
  ``[L, D]`` per image / video, ``join_units(modality, units, expansion)`` back;
* ``crop_layouts(inputs)``, ``video_units(modality, inputs, features)``,
  ``uncompressed_counts(modality, inputs, reduced)`` (a ViT method inside the tower);
* ``with_features(inputs, encoded)``: the call's arguments with the pixels replaced by features;
* optional, for positions that say where each token was (Qwen-VL's M-RoPE): ``prompt_columns(inputs,
  units)`` -> the ``sources`` and ``columns`` of :func:`~vitcompress.runtimes.prompt.rewrite_prompt`
  (``units``: the per-unit stats of the call), and ``prefilled(prepared)``, told the rewritten call.

:func:`prefill_hook` and :func:`compressed_generate` are what an adapter patches onto the model.

Configuration on the model, state per call: nothing is written on the runtime or the adapter
during a call; what the last prefill did is kept per thread.
"""
import functools
import inspect
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..engine.patching import Patcher, PerThread
from ..interfaces import Method, runtime_of
from .prompt import rewrite_prompt, unit_rows

Tensor = torch.Tensor


class TappedAttention(NamedTuple):
    """The q and k projections ``[crops, 1 + N, H * d]`` (CLS first) one tower layer computed in
    one call, with the layer's head count and softmax scale, and the layer's output ``hidden``
    ``[crops, 1 + N, C]``. ``cells``: None when each of the N patches becomes one visual token; else
    ``[M, G]``, the G patches each of a crop's M tokens is built from after the tower (InternVL's pixel
    shuffle), in the order the model concatenates them. ``class_token``: False for a tower without
    [CLS] (SigLIP): then the N patches are all the tokens, ``[crops, N, ...]``."""

    q: Tensor
    k: Tensor
    num_heads: int
    scale: float
    hidden: Optional[Tensor] = None
    cells: Optional[Tensor] = None
    class_token: bool = True


class TowerTaps:
    """The q/k projections of some vision-tower layers, captured while this thread encodes.

    Safe for concurrent calls: the adapter registers one forward hook per projection once, at
    compress time (through the patcher's handles; no call adds or removes hooks on the shared
    modules), and every hook writes into the calling thread's own capture, only while that thread
    is inside :meth:`run`. A forward of the tower anywhere else records nothing.
    """

    def __init__(self, layers: Sequence[Tuple[int, int, float]], cells: Optional[Tensor] = None,
                 class_token: bool = True):
        """``layers``: ``(layer, num_heads, scale)`` in the order the method asked for them;
        ``cells``: the patches of each visual token; ``class_token``: whether the tower has [CLS]
        (:class:`TappedAttention`)."""
        self.layers = tuple(layers)
        self.cells = cells
        self.class_token = class_token
        self._captured = PerThread()

    def hooked_layers(self) -> List[int]:
        return sorted({layer for layer, _, _ in self.layers})

    def hook(self, layer: int, projection: str) -> Callable:
        """The forward hook for ``layer``'s ``projection`` ("q", "k", or "hidden": the layer's output); a
        partial of a bound method, so deepcopy and pickle of the model carry it to the copy's taps."""
        return functools.partial(self._record, layer, projection)

    def _record(self, layer: int, projection: str, module, args, output) -> None:
        captured = self._captured.get()
        if captured is not None:
            captured[layer, projection] = (output[0] if isinstance(output, tuple) else output).detach()

    def run(self, encode: Callable[[], Any]) -> Tuple[Any, List[TappedAttention]]:
        """``encode()``'s result and what it computed in the tapped layers, in the method's order."""
        captured: Dict[Tuple[int, str], Tensor] = {}
        self._captured.set(captured)
        try:
            result = encode()
        finally:
            self._captured.set(None)
        missing = [layer for layer in self.hooked_layers() if not {(layer, "q"), (layer, "k")} <= captured.keys()]
        if missing:
            raise RuntimeError(f"the vision tower did not run its layers {missing} while encoding")
        return result, [TappedAttention(captured[layer, "q"], captured[layer, "k"], heads, scale,
                                        captured.get((layer, "hidden")), self.cells, self.class_token)
                        for layer, heads, scale in self.layers]


def _questions(method: str, question, batch: int) -> List[str]:
    """The call's question per sample (one string for all, or one per sample)."""
    if question is None:
        raise ValueError(f"{method} needs the question: pass it with the call, e.g. model.generate(**inputs, "
                         "question=\"What is the man holding?\") (a string, or one string per sample)")
    if isinstance(question, str):
        return [question] * batch
    question = list(question)
    if len(question) != batch or not all(isinstance(q, str) for q in question):
        raise ValueError(f"question= must be a string or {batch} strings (one per sample), got {question!r}")
    return question


class LlavaRuntime:
    """What ``compress`` attaches to a LLaVA-like model: the method, its options and budget, and the
    prefill step (:meth:`prepare`). ``tower``: a ViT method's runtime inside the vision tower (the
    method then reduces no modality here); ``taps``: the tower q/k a crop method reads."""

    def __init__(self, adapter, method: Method, options: Dict[str, Any], budget, tower=None,
                 taps: Optional[TowerTaps] = None):
        self.adapter = adapter
        self.method = method
        self.options = options
        self.budget = budget
        self.tower = tower
        self.taps = taps
        self.patcher = Patcher()
        self.reduced_modality = None  # the modality the method reduces here
        if tower is None:
            method.check_budget(budget)
            self.reduced_modality = adapter.unit_modality(method.unit)
        self._last_prefill = PerThread()  # {modality: per-unit stats} of this thread's last prefill

    # ---------------------------------------------------------------- the prefill
    def prepare(self, inputs: Dict[str, Any], question=None, expansion: int = 1) -> Dict[str, Any]:
        """The keyword arguments of one ``forward`` / ``generate`` call with the visual tokens
        reduced and the placeholders rewritten; unchanged when there are no pixels. ``question``:
        the call's question (QuoTA); ``expansion``: rows ``generate`` makes of each sample."""
        present = self.adapter.modalities_in(inputs)
        if not present:
            return inputs
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("a compressed LLaVA needs input_ids (not inputs_embeds) with its pixels: the "
                             "image/video placeholders in input_ids are rewritten to the reduced token count")
        encoded, counts, units = {}, {}, {}
        for modality in present:
            features, old, new, units[modality] = self._reduce(modality, inputs, question, expansion)
            encoded[modality] = features
            counts[self.adapter.token_id(modality)] = (modality, old, new)
        prepared = self.adapter.with_features(inputs, encoded)
        prompt_columns = getattr(self.adapter, "prompt_columns", None)
        kept_columns = prompt_columns(inputs, units) if prompt_columns is not None else {}
        prepared.update(rewrite_prompt(input_ids, inputs.get("attention_mask"), inputs.get("labels"),
                                       inputs.get("position_ids"), counts, self.adapter.pad_token_id, **kept_columns))
        if hasattr(self.adapter, "prefilled"):
            self.adapter.prefilled(prepared)
        self._last_prefill.set(units)
        return prepared

    def _reduce(self, modality, inputs, question, expansion):
        """-> (features in the model's format, tokens per unit before and after, per-unit stats)."""
        frames_as_crops = getattr(self.adapter, "frames_as_crops", ())  # OneVision videos: each frame a crop
        crop_method = self.tower is None and self.method.unit == "crop"  # a ViT method in the tower has no unit
        if crop_method and (modality == self.reduced_modality or modality in frames_as_crops):
            return self._reduce_crops(modality, inputs, expansion, question)
        features = self.adapter.encode(modality, inputs)
        if modality == self.reduced_modality:
            return self._reduce_videos(modality, inputs, features, question, expansion)
        new = [u.shape[0] for u in self.adapter.split_units(modality, features)]
        old = self.adapter.uncompressed_counts(modality, inputs, new) if self.tower is not None else new
        return features, old, new, [{"tokens_before": o, "tokens_after": n} for o, n in zip(old, new)]

    def _reduce_crops(self, modality, inputs, expansion, question=None):
        adapter = self.adapter
        features, taps = self.taps.run(lambda: adapter.encode(modality, inputs))
        images = adapter.split_units(modality, features)
        context = {}
        if self.method.needs_question:  # each image gets its sample's question
            rows = unit_rows(inputs["input_ids"], adapter.token_id(modality), [f.shape[0] for f in images], modality)
            questions = _questions(self.method.name, question, inputs["input_ids"].shape[0])
            context["questions"] = [questions[row] for row in rows]
        if self.method.reads_features:
            context["project"] = functools.partial(adapter.project, modality)
        layouts = adapter.crop_layouts(inputs) if modality == self.reduced_modality else adapter.frame_layouts(inputs)
        reduced, reports = self.method.reduce_images(images, layouts, taps, self.options, **context)
        old, new = [f.shape[0] for f in images], [r.shape[0] for r in reduced]
        stats = [dict(report, tokens_before=o, tokens_after=n) for report, o, n in zip(reports, old, new)]
        return adapter.join_units(modality, reduced, expansion), old, new, stats

    def _reduce_videos(self, modality, inputs, features, question, expansion):
        """One budget per video, split across its frames. Images taken as frames: the images of
        one sample are the frames of one video (each image keeps its own placeholders). Each
        unit's stats say which of the video's frames are its own (``frames``: indices into the
        method's per-frame lists such as ``grid``) and each frame's token grid before
        (``frame_grids``)."""
        adapter, input_ids = self.adapter, inputs["input_ids"]
        units = adapter.video_units(modality, inputs, features)  # (frames, grids, head, tail)
        old = [sum(g.shape[0] * g.shape[1] for g in grids) + head.shape[0] + tail.shape[0]
               for _, grids, head, tail in units]
        rows = unit_rows(input_ids, adapter.token_id(modality), old, modality)
        questions = _questions(self.method.name, question, input_ids.shape[0])
        if modality == "image":
            videos = [[u for u, r in enumerate(rows) if r == b] for b in sorted(set(rows))]
        else:
            videos = [[u] for u in range(len(units))]
        tokens_of, stats = [None] * len(units), [None] * len(units)
        for video in videos:
            frames = torch.cat([units[u][0] for u in video])
            grids = [g for u in video for g in units[u][1]]
            tokens, report = self.method.reduce_video(frames, grids, self.budget.value, questions[rows[video[0]]],
                                                      self.options)
            first = 0
            for u in video:
                _, grids_u, head, tail = units[u]
                span = slice(first, first + len(grids_u))
                first += len(grids_u)
                tokens_of[u] = torch.cat([head] + tokens[span] + [tail])
                stats[u] = dict(report, tokens_before=old[u], tokens_after=tokens_of[u].shape[0],
                                extra_tokens=head.shape[0] + tail.shape[0], frames=list(range(span.start, span.stop)),
                                frame_grids=[tuple(g.shape[:2]) for g in grids_u])
        new = [t.shape[0] for t in tokens_of]
        return adapter.join_units(modality, tokens_of, expansion), old, new, stats

    # ---------------------------------------------------------------- reporting
    def stats(self) -> Dict[str, Any]:
        """Method, options and what the calling thread's last prefill did to each image / video."""
        units = self._last_prefill.get() or {}
        out = {
            "method": self.method.name,
            "family": self.adapter.family,
            "budget": self.budget.describe() if self.budget.value is not None else (
                "content-dependent" if self.method.dynamic else "set by the method's options"),
            "options": {k: (v if v is None or isinstance(v, (int, float, str, bool, tuple, list))
                            else type(v).__name__) for k, v in self.options.items()},
        }
        out.update(units)
        out["visual_tokens_before"] = sum(u["tokens_before"] for us in units.values() for u in us)
        out["visual_tokens_after"] = sum(u["tokens_after"] for us in units.values() for u in us)
        if self.tower is not None:
            out["tower"] = self.tower.stats()
        return out


# ---------------------------------------------------------------- what an adapter patches onto the model


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


def prefill_hook(model, args, kwargs):
    """Forward pre-hook: the call's arguments with the visual tokens reduced at prefill
    (:meth:`LlavaRuntime.prepare`). A hook rather than a new ``forward`` keeps the model's forward
    signature, which ``generate`` validates its keyword arguments against."""
    question = kwargs.pop("question", None)
    return (), runtime_of(model).prepare(_named_arguments(type(model).forward, model, args, kwargs), question)


def compressed_generate(model, *args, **kwargs):
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
    expansion = max(kwargs.get("num_beams") or config.num_beams or 1, 1) * max(
        kwargs.get("num_return_sequences") or config.num_return_sequences or 1, 1)
    prepared = runtime_of(model).prepare(kwargs, question, expansion)
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
