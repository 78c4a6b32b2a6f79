"""QuoTA: query-oriented token assignment across the frames of a video (video LLMs).

For one video of ``F`` frames and a question:

* **Relevance**, :func:`frame_probabilities`: every frame gets ``p_i`` in [0, 1]. The paper asks
  the LVLM "does this frame help answer the question? yes/no" per frame and reads ``p("yes")``;
  here the scorer is pluggable: any ``callable(frames, question) -> p[F]`` (that is where an LVLM
  yes-probability goes), or the built-in CLIP image-text scorer (:func:`clip_probabilities`) on a
  ``transformers.CLIPModel`` or an open_clip CLIP model with its tokenizer.
* **Assignment**, :func:`allocate`: ``w_i = (100 p_i)^2`` normalised to sum 1 and
  ``n_i = int(budget * w_i)``. The total never exceeds the budget: ``sum floor(x_i) <= floor(sum
  x_i)`` and the rounding of the normalised weights is far below one token.
* **Resizing**, :func:`resize_grid`: each frame's token grid ``h x w`` is resized (bilinear) to
  ``h' x w'`` tokens with ``h' * w' <= n_i`` (:func:`grid_shape`); frames with ``n_i <= 0`` are
  dropped. A frame may get more than its original ``h * w`` (upsampled) when it takes a large
  share of a budget: the formula, not a cap, decides.

Choices where the paper leaves room:

* The budget is ``keep`` times the video's uncompressed visual tokens (default ``keep=0.5``;
  ``keep=1.0`` is the paper's setting: the same budget as the model without QuoTA, reallocated).
* Grid shape (:func:`grid_shape`): keep the aspect ratio: ``h' = round(sqrt(n h / w))`` (at least
  1, at most ``n``), ``w' = floor(n / h')``.
* The CLIP scorer's ``p_i`` is CLIP's zero-shot probability over the frames,
  ``softmax_i(logit_scale * cos(frame_i, question))``: the frames compete for the question as
  classes compete for an image. It receives the frames as the LLaVA processor normalised them,
  resized to the scorer's input size -- exact for LLaVA-1.5 / LLaVA-NeXT-Video, whose processors
  use CLIP's normalisation; pass a callable for anything else.
* If every ``p_i`` is 0 the frames are equally (ir)relevant and the weights are uniform.
* Tokens are resized after the projector (and after the model's own video pooling), as
  LLaVA-Video / OneVision pool their video tokens.
* The question is given per call: ``model.generate(**inputs, question="...")`` (a string, or one
  per sample of the batch); the runtime passes each video its sample's question.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..interfaces import LlavaMethod

Tensor = torch.Tensor


def frame_weights(probs: Sequence[float]) -> List[float]:
    """``w_i = (100 p_i)^2 / sum_j (100 p_j)^2`` (uniform when every ``p_i`` is 0)."""
    squares = [(100.0 * float(p)) ** 2 for p in probs]
    total = sum(squares)
    if total == 0.0:
        return [1.0 / len(squares)] * len(squares)
    return [s / total for s in squares]


def allocate(probs: Sequence[float], budget: int) -> List[int]:
    """Tokens assigned to each frame: ``n_i = int(budget * w_i)``; ``sum(n_i) <= budget``."""
    return [int(budget * w) for w in frame_weights(probs)]


def grid_shape(h: int, w: int, n: int) -> Tuple[int, int]:
    """Grid ``(h', w')`` of about ``n`` tokens with the aspect ratio of ``h x w`` and ``h' w' <= n``;
    ``(0, 0)`` when ``n <= 0`` (the frame is dropped)."""
    if n <= 0:
        return 0, 0
    rows = min(n, max(1, round(math.sqrt(n * h / w))))
    return rows, n // rows


def resize_grid(grid: Tensor, shape: Tuple[int, int]) -> Tensor:
    """``grid[h, w, D]`` -> ``[h' * w', D]`` tokens by bilinear resizing (unchanged at the same shape)."""
    h, w, D = grid.shape
    if shape == (h, w):
        return grid.reshape(h * w, D)
    if shape[0] * shape[1] == 0:
        return grid.new_zeros(0, D)
    out = F.interpolate(grid.permute(2, 0, 1)[None], size=shape, mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).reshape(-1, D)


def assign_tokens(grids: Sequence[Tensor], probs: Sequence[float], budget: int):
    """The ``F`` frame grids ``[h, w, D]`` of one video -> (per-frame token tensors, allocation
    ``n_i``, grid shapes)."""
    alloc = allocate(probs, budget)
    shapes = [grid_shape(g.shape[0], g.shape[1], n) for g, n in zip(grids, alloc)]
    return [resize_grid(g, s) for g, s in zip(grids, shapes)], alloc, shapes


def _is_hf_tokenizer(tokenizer) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:
        return False
    return isinstance(tokenizer, PreTrainedTokenizerBase)


def _clip_kind(model) -> Optional[str]:
    if callable(getattr(model, "get_image_features", None)) and callable(getattr(model, "get_text_features", None)):
        return "hf"
    if callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None)):
        return "open_clip"
    return None


def _image_size(model, kind: str) -> Tuple[int, int]:
    size = model.config.vision_config.image_size if kind == "hf" else model.visual.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _pooled(out) -> Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projected embedding."""
    return out if isinstance(out, Tensor) else out.pooler_output


@torch.no_grad()
def clip_probabilities(model, tokenizer, frames: Tensor, question: str) -> Tensor:
    """``softmax_i(logit_scale * cos(frame_i, question))`` with a CLIP model; ``frames[F, 3, H, W]``
    normalised as CLIP expects (resized to the model's input size here)."""
    kind = _clip_kind(model)
    param = next(model.parameters())
    size = _image_size(model, kind)
    if tuple(frames.shape[-2:]) != size:
        frames = F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False)
    frames = frames.to(param.device, param.dtype)
    if _is_hf_tokenizer(tokenizer):
        text = dict(tokenizer([question], padding=True, truncation=True, return_tensors="pt"))
    else:
        text = tokenizer([question])
        text = dict(text) if not isinstance(text, Tensor) else {"input_ids": text}
    text = {k: v.to(param.device) for k, v in text.items()}
    if kind == "hf":
        image_emb = _pooled(model.get_image_features(pixel_values=frames))
        text_emb = _pooled(model.get_text_features(**text))
    else:
        image_emb, text_emb = model.encode_image(frames), model.encode_text(text["input_ids"])
    cos = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1)[0]
    return (model.logit_scale.exp().float() * cos).softmax(dim=0)


def frame_probabilities(scorer, tokenizer, frames: Tensor, question: str) -> List[float]:
    """Relevance ``p_i`` of each of the ``F`` frames to ``question``, checked to be F numbers in [0, 1]."""
    if _clip_kind(scorer) is not None:
        probs = clip_probabilities(scorer, tokenizer, frames, question)
    else:
        probs = scorer(frames, question)
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
    if probs.numel() != frames.shape[0]:
        raise ValueError(f"the QuoTA scorer returned {probs.numel()} values for {frames.shape[0]} frames; "
                         "it must return one yes-probability per frame")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or bool((probs > 1).any()):
        raise ValueError(f"the QuoTA scorer returned {probs.tolist()}: yes-probabilities must lie in [0, 1]")
    return probs.tolist()


class QuoTA(LlavaMethod):
    """Descriptor: the runtime hands it each video's frames, token grids and question."""

    name = "quota"
    kind = "merge"  # bilinear resizing mixes neighbouring tokens
    dynamic = True  # the token count (sum of h'w' <= budget) depends on the scores
    target = "llava"
    unit = "video"  # reallocates a budget across the frames of one video
    defaults = {"scorer": None, "tokenizer": None}
    default_budget = {"keep": 0.5}
    option_help = {
        "scorer": "callable(frames, question) -> yes-probability per frame, or a CLIP model",
        "tokenizer": "the CLIP model's tokenizer, with a CLIP scorer",
    }
    keep_means = "fraction of each video's visual tokens kept (the QuoTA budget)"

    def validate(self, options) -> None:
        scorer, tokenizer = options["scorer"], options["tokenizer"]
        if scorer is None:
            raise ValueError("quota needs scorer=: a callable(frames, question) -> yes-probability per frame, "
                             "or a CLIP model (transformers CLIPModel or open_clip) together with tokenizer=")
        kind = _clip_kind(scorer)
        if kind is None and not callable(scorer):
            raise TypeError(f"scorer={type(scorer).__name__}: pass a callable(frames, question) or a CLIP model")
        if kind is not None and tokenizer is None:
            raise ValueError("a CLIP scorer needs tokenizer= for the question (the CLIP model's tokenizer: "
                             "transformers CLIPTokenizer or open_clip.get_tokenizer(name))")
        if kind is None and tokenizer is not None:
            raise ValueError("tokenizer= is only used with a CLIP scorer; a callable scorer gets the question as text")

    def reduce_video(self, frames: Tensor, grids: Sequence[Tensor], keep: float, question: str,
                     options: Dict[str, Any]) -> Tuple[List[Tensor], Dict[str, Any]]:
        """The video's budget is ``keep`` of its uncompressed visual tokens, split by relevance."""
        budget = int(keep * sum(g.shape[0] * g.shape[1] for g in grids) + 1e-9)
        probs = frame_probabilities(options["scorer"], options["tokenizer"], frames, question)
        tokens, alloc, shapes = assign_tokens(grids, probs, budget)
        return tokens, {"budget": budget, "probabilities": probs, "allocation": alloc, "grid": shapes,
                        "frame_tokens": [h * w for h, w in shapes]}
