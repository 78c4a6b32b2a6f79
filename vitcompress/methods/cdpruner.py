"""CDPruner (2025): conditional determinantal point process selection of visual tokens, before the
language model.

Per image (all its crops together), as the official LLaVA code does it:

* **Similarity**: cosine similarity of the projected visual tokens (the features the language model
  would see), per crop ``[N, N]``.
* **Relevance to the instruction**, :func:`relevance`: the cosine similarity of each patch's CLIP image
  embedding (the tower's post-layernorm and CLIP's visual projection on the patches of the feature
  layer) to the CLIP text embedding of the question (split into segments of the text tower's
  length; ``M`` segments), **negated** and averaged over the segments, then min-max normalised over the
  image's patches: ``r = (s - min s + 1e-6) / (max s - min s)`` with ``s = -mean_m cos``. The negation
  is the official code's (``relevance = (-relevance).mean(dim=-1)``).
* **Kernel**, :func:`conditional_kernel`: ``L = diag(r) S diag(r)``.
* **Selection**, :func:`greedy_map`: the fast greedy MAP inference of the DPP (incremental Cholesky,
  Chen et al. 2018): ``tokens`` steps, each picking the token with the largest remaining marginal
  gain; the kept tokens in index order.

The instruction embedding: the official code loads ``CLIPTextModelWithProjection`` and the visual
projection of the tower's own checkpoint (``openai/clip-vit-large-patch14-336`` for LLaVA-1.5) and
embeds the question without the answer-format line. Here ``clip=`` takes that checkpoint as a
``transformers.CLIPModel`` with ``tokenizer=`` (its tokenizer), or ``scorer=`` a
``callable(patch_features [crops, N, C], question) -> cosine similarity [crops, N] or [crops, N, M]``
(before the negation and normalisation above), e.g. a random-weight text encoder for offline tests.

On LLaVA-NeXT each crop keeps ``tokens`` tokens (the official ``32 * 5 = 160``), chosen on its full
patch grid; the model then unpads the grid, and every row's newline token stays (as in the official
code). With a batch the official code embeds every sample's question together and normalises the
relevance over the whole batch; here each image uses its own sample's question and its own crops
(the same at batch size 1, the official evaluation's).

On LLaVA-OneVision (SigLIP, no [CLS]; no official code) each crop of an image and each frame of a video
keeps ``tokens`` tokens by the same selection, packed as VisionZip packs OneVision
(:func:`reduce_images_without_cls`); the relevance comes from ``scorer=``.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..interfaces import LlavaMethod, TokenFeatures
from .visionzip import onevision_tokens

Tensor = torch.Tensor


def relevance(similarity: Tensor) -> Tensor:
    """Cosine similarity to the instruction ``[..., N, M]`` (or ``[..., N]``) -> relevance ``[..., N]``
    in ``(0, 1]``: negated, averaged over the ``M`` text segments, min-max normalised over all of it."""
    if similarity.dim() == 2:
        similarity = similarity[..., None]
    s = (-similarity).mean(dim=-1)
    return (s - s.min() + 1e-6) / (s.max() - s.min())


def conditional_kernel(features: Tensor, rel: Tensor) -> Tensor:
    """``features[B, N, D]``, ``rel[B, N]`` -> the DPP kernel ``r_i cos(f_i, f_j) r_j`` ``[B, N, N]``."""
    unit = features / features.norm(dim=-1, keepdim=True)
    unit = unit.float()
    return rel[:, :, None] * (unit @ unit.transpose(1, 2)) * rel[:, None, :]


def greedy_map(kernel: Tensor, tokens: int) -> Tensor:
    """Greedy MAP of the DPP with ``kernel[B, N, N]``: ``tokens`` indices per row, ascending ``[B, tokens]``.

    Keeps the Cholesky rows ``c`` of the chosen set: the gain of token ``n`` is ``d2[n] = L[n, n] -
    |c[:, n]|^2``; choosing ``j`` adds the row ``(L[j] - c[:, j]ᵀ c) / sqrt(d2[j])``."""
    B, N, _ = kernel.shape
    rows = torch.arange(B, device=kernel.device)
    chol = kernel.new_zeros(tokens, B, N)
    gain = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    chosen = torch.empty(tokens, B, dtype=torch.long, device=kernel.device)
    for step in range(tokens):
        j = gain.argmax(dim=-1)
        chosen[step] = j
        row = kernel[rows, j] - torch.einsum("sb,sbn->bn", chol[:step, rows, j], chol[:step])
        row = row / gain[rows, j].sqrt()[:, None]
        chol[step] = row
        gain = gain - row.square()
        gain[rows, j] = -float("inf")
    return chosen.t().sort(dim=-1).values


def text_segments(tokenizer, question: str, length: int) -> Dict[str, Tensor]:
    """The question tokenized, zero-padded to a multiple of ``length`` and cut into ``[M, length]``."""
    encoded = tokenizer(text=[question], return_tensors="pt")
    ids = encoded["input_ids"]
    segments = (ids.shape[1] - 1) // length + 1
    pad = length * segments - ids.shape[1]
    return {k: torch.cat([v, v.new_zeros(v.shape[0], pad)], dim=1).reshape(-1, length) for k, v in encoded.items()
            if k in ("input_ids", "attention_mask")}


def _pooled(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output


@torch.no_grad()
def clip_similarity(clip, tokenizer, patches: Tensor, question: str) -> Tensor:
    """``patches[crops, N, C]`` (the tower's feature layer) -> cosine similarity to the question's
    segments ``[crops, N, M]`` with a ``transformers.CLIPModel`` of the tower's checkpoint."""
    param = next(clip.parameters())
    text = {k: v.to(param.device) for k, v in
            text_segments(tokenizer, question, clip.config.text_config.max_position_embeddings).items()}
    text_embeds = _pooled(clip.get_text_features(**text))
    image_embeds = clip.visual_projection(clip.vision_model.post_layernorm(patches.to(param.dtype)).float())
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return image_embeds @ text_embeds.float().t()


def select_tokens(features: Tensor, similarity: Tensor, tokens: int) -> Tensor:
    """One image: its crops' projected tokens ``features[crops, N, D]`` and their similarity to the
    instruction ``[crops, N(, M)]`` -> the kept patches of each crop, ascending ``[crops, tokens]``.
    More tokens than the features' width (the kernel's rank) is refused: the greedy gains would run out
    (NaN in the official code) and repeat tokens."""
    tokens = min(tokens, features.shape[1])
    if tokens > features.shape[-1]:
        raise ValueError(f"cdpruner tokens={tokens}: the DPP kernel of {features.shape[-1]}-wide projected tokens has "
                         f"rank at most {features.shape[-1]}, so at most that many distinct tokens can be chosen; "
                         f"give tokens <= {features.shape[-1]}")
    return greedy_map(conditional_kernel(features, relevance(similarity.float())), tokens)


class CDPruner(LlavaMethod):
    """Descriptor: per image, the projected patch tokens of every crop and the question's relevance ->
    :func:`select_tokens`."""

    name = "cdpruner"
    kind = "prune"
    dynamic = False
    target = "llava"
    unit = "crop"
    reads_features = True
    reads_towers_without_cls = True  # LLaVA-OneVision's SigLIP: reduce_images_without_cls
    needs_question = True
    defaults = {"tokens": 64, "clip": None, "tokenizer": None, "scorer": None}
    option_help = {
        "tokens": "visual tokens kept per crop (paper on LLaVA-1.5: 64 / 128 / 192 of 576)",
        "clip": "transformers CLIPModel of the tower's checkpoint: embeds the question (with tokenizer=)",
        "tokenizer": "the CLIP model's tokenizer, with clip=",
        "scorer": "callable(patch_features, question) -> cosine similarity per patch, instead of clip=",
    }
    keep_means = "not used: the tokens kept are tokens= per crop"
    default_budget = {"keep": None}  # set by tokens=

    def check_budget(self, budget) -> None:
        if budget.value is not None:
            raise ValueError(f"{self.name} keeps tokens= visual tokens per crop (the paper's 64 / 128 / 192); it "
                             f"takes no keep=/r=/flops= (got {budget.describe()})")

    def validate(self, options) -> None:
        tokens = options["tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens={tokens!r}: visual tokens kept per crop, an int >= 1")
        clip, tokenizer, scorer = options["clip"], options["tokenizer"], options["scorer"]
        if (clip is None) == (scorer is None):
            raise ValueError("cdpruner needs the instruction's relevance from exactly one of clip= (a transformers "
                             "CLIPModel of the vision tower's checkpoint, with tokenizer=) or scorer= (a "
                             "callable(patch_features, question) -> cosine similarity per patch)")
        if clip is not None:
            if not all(hasattr(clip, a) for a in ("get_text_features", "visual_projection", "vision_model")):
                raise TypeError(f"clip={type(clip).__name__}: a transformers CLIPModel (text tower, visual "
                                "projection and post-layernorm of the vision tower's checkpoint)")
            if tokenizer is None:
                raise ValueError("clip= needs tokenizer= (the CLIP checkpoint's tokenizer) for the question")
        elif not callable(scorer):
            raise TypeError(f"scorer={type(scorer).__name__}: a callable(patch_features, question)")
        elif tokenizer is not None:
            raise ValueError("tokenizer= is only used with clip=; a scorer gets the question as text")

    def tower_layers(self, options, depth: int, feature_layer=None) -> Tuple[int, ...]:
        return ()  # only the feature layer, which the runtime adds

    def similarity(self, options, patches: Tensor, question: str) -> Tensor:
        if options["clip"] is not None:
            return clip_similarity(options["clip"], options["tokenizer"], patches, question)
        similarity = torch.as_tensor(options["scorer"](patches, question))
        if similarity.shape[:2] != patches.shape[:2]:
            raise ValueError(f"the cdpruner scorer returned {tuple(similarity.shape)} for {tuple(patches.shape[:2])} "
                             "patches: one cosine similarity per patch ([crops, N] or [crops, N, M])")
        return similarity.to(patches.device)

    def reduce_images(self, images: Sequence[Tensor], layouts: Sequence[Tuple[Tensor, int]], taps: Sequence[Any],
                      options: Dict[str, Any], questions: Optional[Sequence[str]] = None,
                      project=None) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
        if isinstance(taps[-1], TokenFeatures):  # a tower without [CLS] (Qwen-VL)
            return self.reduce_merged_images(images, taps[-1], options, questions, project)
        if not taps[0].class_token:
            return reduce_images_without_cls(self, images, layouts, taps, options, questions, project)
        (features,) = taps
        if features.cells is not None:  # InternVL: tokens of 2 x 2 patches, no [CLS] token handed on
            return reduce_cell_crops(self, images, layouts, features, options, questions)
        reduced, reports, first = [], [], 0
        for tokens, (layout, crops), question in zip(images, layouts, questions):
            with torch.no_grad():
                patches = features.hidden[first:first + crops, 1:]
                first += crops
                projected = project(patches)
                kept = select_tokens(projected, self.similarity(options, patches, question), options["tokens"])
            N = patches.shape[1]
            chosen = torch.zeros(crops * N + 1, dtype=torch.bool, device=layout.device)
            chosen[(kept + torch.arange(crops, device=kept.device)[:, None] * N).flatten().to(layout.device)] = True
            keep = chosen[layout.clamp(min=-1)] | (layout == -1)  # -1 -> the last slot (False); newlines stay
            reduced.append(tokens[keep])
            reports.append({"kept": [k.tolist() for k in kept] if crops > 1 else kept[0].tolist(),
                            "newline_tokens": int((layout == -1).sum())})
        return reduced, reports

    def reduce_merged_images(self, images: Sequence[Tensor], features: TokenFeatures, options: Dict[str, Any],
                             questions: Sequence[str], project) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
        """A tower without [CLS] and without a CLIP text tower (Qwen-VL): per image, the similarity of
        its projected tokens (``project`` of the projector's input, the tokens the language model gets)
        and ``scorer(projected [1, N, D], question)`` as the relevance (:func:`embedding_scorer`
        compares them to the language model's embeddings of the question) -> :func:`select_tokens`."""
        if options["clip"] is not None:
            raise ValueError("cdpruner's clip= embeds the question with the CLIP checkpoint of a CLIP vision tower; "
                             "this model's tower has none: pass scorer=, e.g. cdpruner.embedding_scorer("
                             "model.get_input_embeddings(), tokenizer)")
        reduced, reports = [], []
        for image, hidden, question in zip(images, features.hidden, questions):
            with torch.no_grad():
                projected = project(hidden)[None]
                kept = select_tokens(projected, self.similarity(options, projected, question), options["tokens"])[0]
            reduced.append(image[kept.to(image.device)])
            reports.append({"kept": kept.tolist(), "sources": kept.tolist()})
        return reduced, reports


def reduce_cell_crops(method: CDPruner, images: Sequence[Tensor], layouts: Sequence[Tuple[Tensor, int]], features,
                      options: Dict[str, Any], questions: Sequence[str]) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
    """:meth:`CDPruner.reduce_images` for a tower whose tokens are groups of patches (``features.cells``,
    InternVL): every crop (every tile, the thumbnail included) keeps ``tokens`` of its M tokens, the DPP
    kernel on its projected tokens (the image's own features) and the relevance from the scorer on the
    tokens' features before the projector (``features.hidden[crops, M, C]``), normalised over the image."""
    reduced, reports, first = [], [], 0
    for tokens, (_, crops), question in zip(images, layouts, questions):
        with torch.no_grad():
            hidden = features.hidden[first:first + crops]
            first += crops
            projected = tokens.reshape(crops, hidden.shape[1], tokens.shape[-1])
            kept = select_tokens(projected, method.similarity(options, hidden, question), options["tokens"])
        rows = torch.arange(crops, device=kept.device)[:, None]
        reduced.append(projected[rows, kept.to(projected.device)].reshape(-1, tokens.shape[-1]))
        reports.append({"kept": [k.tolist() for k in kept]})
    return reduced, reports


def reduce_images_without_cls(method, images, layouts, taps, options, questions, project):
    """:meth:`CDPruner.reduce_images` on a tower without [CLS] (LLaVA-OneVision's SigLIP): each crop keeps
    ``tokens`` of its patches (:func:`select_tokens` on its full grid; a video's frame is a crop), packed as
    VisionZip packs OneVision (:func:`~vitcompress.methods.visionzip.onevision_tokens`: base crop, grid
    crops in raster order, no unpadding / anyres_max downsampling / newlines; a one-crop image and a
    video: crops in sequence and the newline)."""
    (features,) = taps
    reduced, reports, first = [], [], 0
    for image, (layout, crops), question in zip(images, layouts, questions):
        with torch.no_grad():
            patches = features.hidden[first:first + crops]
            first += crops
            projected = project(patches)
            kept = select_tokens(projected, method.similarity(options, patches, question), options["tokens"])
            tokens = torch.gather(projected, 1, kept[..., None].expand(-1, -1, projected.shape[-1]))
        N = patches.shape[1]
        reduced.append(onevision_tokens(tokens, kept, layout, N, image[-1:]).to(image.dtype))  # [-1]: a newline
        reports.append({"kept": [k.tolist() for k in kept] if crops > 1 else kept[0].tolist(),
                        "newline_tokens": int(layout.numel() == crops * N + 1)})
    return reduced, reports


def embedding_scorer(embedding: torch.nn.Module, tokenizer) -> Callable[[Tensor, str], Tensor]:
    """CDPruner's ``scorer=`` for a model without a CLIP text tower (Qwen-VL): the cosine similarity
    ``[crops, N, M]`` of each projected visual token (what the language model gets) to the language
    model's input embedding of each of the question's ``M`` tokens. ``embedding``: the model's
    ``get_input_embeddings()``; ``tokenizer``: its tokenizer (``tokenizer(text=[question])["input_ids"]``)."""

    @torch.no_grad()
    def scorer(tokens: Tensor, question: str) -> Tensor:
        ids = torch.as_tensor(tokenizer(text=[question])["input_ids"])[0].to(embedding.weight.device)
        text = embedding(ids).float()
        text = text / text.norm(dim=-1, keepdim=True)
        visual = tokens.float() / tokens.float().norm(dim=-1, keepdim=True)
        return visual @ text.t()

    return scorer
