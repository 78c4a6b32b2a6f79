"""Draw what a compressed ViT kept: which patches each remaining token stands for.

Users judge a token-reduction method first by looking at what it kept (ToMe's
``make_visualization`` does this for ToMe). The runtime already tracks, when asked
(``trace_source=True``), which original patches every token covers; this module turns that map into
a label per patch and draws it over the input image: merge groups as coloured regions with their
borders, tokens that still stand for one patch as the plain image, pruned patches hatched grey.

The computation is pure and separate from the drawing::

    trace(model, images, blocks=(3, 6))        # -> Trace: regions per patch, after chosen blocks too
    token_regions(source, num_prefix, grid)    # source [B, N, N0] -> LongTensor [B, gh, gw], -1 pruned
    render(picture, regions)                   # one picture's panel as an RGB array

and the figures::

    fig = draw(model, images, blocks=(3, 6))                          # a compressed model, as it is
    fig = compare(model, images, ("tome", "pitome", "zero_tprune"), flops=0.7)  # compresses, restores
    fig.savefig("out.png")

ViT-like encoders (timm ViT/DeiT/EVA/BEiT, open_clip, HF CLIP/ViT/DINOv2/SigLIP), DETR encoders
(the tokens each cascade level of the sparse encoder runs on, over the feature map), the vision
tower of a LLaVA-1.5 compressed with a ViT method, and a LLaVA / LLaVA-NeXT / NeXT-Video / OneVision
compressed with its own methods (:func:`trace_llava`: the visual tokens tokencorr kept of each image
crop, the grid QuoTA resized each video frame to), drawn from what the runtime recorded of the call.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .interfaces import PART_ATTR, part_of, runtime_of

#: Figure geometry (inches, dots per inch): a figure of ``rows x cols`` panels is exactly
#: ``cols * PANEL_INCHES * DPI`` pixels wide and ``(rows * PANEL_INCHES + HEADER_INCHES) * DPI`` high.
PANEL_INCHES = 2.4
HEADER_INCHES = 1.0
DPI = 100

#: Qualitative colours for merge groups (matplotlib's tab10 without its grey), neighbours differ.
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207]], dtype=np.float32) / 255.0

SUPPORTED = "timm ViT/DeiT/EVA/BEiT, open_clip, HF CLIP/ViT/DINOv2/SigLIP"


# --------------------------------------------------------------------------- computation


def patch_grid(height: int, width: int, num_patches: int) -> Tuple[int, int]:
    """The ``(rows, cols)`` patch grid of a ``height x width`` input cut into ``num_patches`` square
    patches: the factorisation whose patch height and width agree best (non-square inputs,
    ``dynamic_img_size``, padded borders)."""
    best = None
    for rows in range(1, num_patches + 1):
        if num_patches % rows:
            continue
        cols = num_patches // rows
        gap = abs(math.log((height / rows) / (width / cols)))
        if best is None or gap < best[0]:
            best = (gap, rows, cols)
    return best[1], best[2]


def token_regions(source: torch.Tensor, num_prefix: int, grid: Tuple[int, int]) -> torch.Tensor:
    """``source[B, N, N0]`` (which of the first block's ``N0`` tokens each of the ``N`` tokens covers,
    prefix tokens first in both) -> ``LongTensor[B, rows, cols]``: per patch, the index among the
    reducible tokens of the token that covers it, -1 where no token does (pruned)."""
    patches = source[:, num_prefix:, num_prefix:]  # special tokens are never merged nor destinations
    covered = patches.amax(dim=1) > 0
    owner = patches.argmax(dim=1)
    regions = torch.where(covered, owner, torch.full_like(owner, -1))
    return regions.reshape(source.shape[0], *grid)


@dataclass
class Trace:
    """What one forward of a compressed model kept, per patch (CPU tensors): ``regions[B, rows, cols]``
    after the last of its ``depth`` blocks and ``after[block]`` after each chosen block (see
    :func:`token_regions`), the reducible tokens left (``tokens``, ``tokens_after``; a DETR's: the most any image kept), the
    patch count, the method, its budget and the FLOPs of this input size as a fraction of the
    uncompressed model's (None for a DETR). ``unit`` names a block in titles."""

    regions: torch.Tensor
    tokens: int
    num_patches: int
    method: str
    budget: str
    flops_ratio: Optional[float]
    depth: int
    after: Dict[int, torch.Tensor] = field(default_factory=dict)
    tokens_after: Dict[int, int] = field(default_factory=dict)
    unit: str = "after block"


def encode_images(model, images: torch.Tensor):
    """The image forward of ``model``: ``get_image_features`` for a two-tower HF model (CLIPModel,
    SiglipModel: their forward needs text too), else ``model(images)`` (an open_clip CLIP runs its
    image tower alone when given no text)."""
    if hasattr(model, "get_image_features"):
        return model.get_image_features(pixel_values=images)
    return model(images)


def _drawable(model):
    """``(module to run, its runtime, the block whose output is drawn as the final tokens or None for
    the last)``: a ViT's or a DETR's own; a LLaVA's vision tower with the ViT method inside it, whose
    language model takes the output of the block ``vision_feature_layer`` names (the hidden states
    count the embeddings first). One-line errors naming the fix otherwise."""
    from .runtimes.sparse_encoder import DetrRuntime
    from .runtimes.vit import ViTRuntime
    from .runtimes.vlm import LlavaRuntime

    runtime = runtime_of(model)
    if runtime is None:
        raise ValueError("this model is not compressed: call vitcompress.compress(model, method, ...) first, or "
                         "use vitcompress.visualize.compare(model, images, methods, flops=...)")
    if isinstance(runtime, (ViTRuntime, DetrRuntime)):
        return model, runtime, None
    if isinstance(runtime, LlavaRuntime) and runtime.tower is not None:
        feature_layer = runtime.adapter.config.vision_feature_layer
        return runtime.adapter.tower, runtime.tower, feature_layer - 1 if feature_layer >= 0 else \
            runtime.tower.adapter.depth + feature_layer
    if isinstance(runtime, LlavaRuntime):
        return model, runtime, None
    raise TypeError(f"vitcompress.visualize draws ViT-like encoders ({SUPPORTED}), DETR encoders and LLaVA vision "
                    f"towers; a {runtime.adapter.family} cannot be drawn")


def _checked_blocks(blocks: Sequence[int], depth: int) -> List[int]:
    """``blocks`` sorted, each refused unless it is one of the ``depth`` blocks drawn."""
    wanted = sorted({int(b) for b in blocks})
    bad = [b for b in wanted if not 0 <= b < depth]
    if bad:
        raise ValueError(f"blocks={bad}: this model has blocks 0 to {depth - 1}; give blocks in that range")
    return wanted


def _blocks_of(model, runtime) -> List[torch.nn.Module]:
    """The patched blocks of ``model`` in order (found by the part each adapter set on them)."""
    blocks = [m for m in model.modules() if PART_ATTR in m.__dict__ and part_of(m).runtime is runtime
              and part_of(m).layer >= 0]
    return sorted(blocks, key=lambda m: part_of(m).layer)


def _flops_ratio(runtime, schedule) -> float:
    """FLOPs of ``schedule`` over those of the same input with nothing removed (the planner's count)."""
    from .engine.schedule import build_schedule

    cost = runtime.adapter.cost()
    base = build_schedule(runtime.method, runtime.options, "r", 0, schedule.tokens[0] - schedule.num_prefix,
                          schedule.num_prefix, schedule.depth)
    return cost.flops(schedule, runtime.method, runtime.options) / cost.flops(base)


def trace(model, images: torch.Tensor, blocks: Sequence[int] = (),
          forward: Optional[Callable] = None) -> Trace:
    """Run ``images`` (``[B, C, H, W]``, as the model takes them) through the compressed ``model`` with
    sources traced, and return which patches each token stands for, after the last block and after
    each block in ``blocks`` (0-based). Tracing is switched on for this call only, and the hooks that
    read the blocks are removed afterwards; outputs are those of a plain forward. ``forward(model,
    images)`` runs the model (default :func:`encode_images`).

    A DETR: the encoder tokens each encoder layer ran on (kept: the token's index; -1 not kept or
    padding), after the last layer and after each layer in ``blocks`` -- by default the first layer
    of every cascade level. A LLaVA-1.5 with a ViT method inside its vision tower: the tower's tokens
    per image crop (``images`` are its ``pixel_values``; ``forward`` gets the tower), the final ones
    those its language model takes (after the block of ``vision_feature_layer``, -2: the one before
    the last); its FLOPs ratio is the tower's."""
    model, runtime, last = _drawable(model)
    if hasattr(runtime, "reduced_modality"):
        raise TypeError(f"a LLaVA compressed with {runtime.method.name} reduces the visual tokens of each crop or "
                        "frame after its vision tower: draw it with vitcompress.visualize.draw(model, inputs) or "
                        "trace_llava(model, inputs), inputs the call's keyword arguments (input_ids, pixel_values, "
                        "...)")
    if not hasattr(runtime, "trace_source"):
        return _trace_detr(model, runtime, images, blocks, forward)
    layers = _blocks_of(model, runtime)
    last = len(layers) - 1 if last is None else last
    wanted = _checked_blocks(blocks, last + 1)
    sources: Dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module, args, output):
            sources[layer] = runtime.current().tokens.source  # replaced, never edited, by later blocks
        return hook

    previous = runtime.trace_source
    handles = []
    try:
        runtime.trace_source = True
        handles = [layers[b].register_forward_hook(capture(b)) for b in sorted(set(wanted) | {last})]
        with torch.no_grad():
            (forward or encode_images)(model, images)
    finally:
        runtime.trace_source = previous
        for handle in handles:
            handle.remove()
    state = runtime.current()
    p = state.tokens.num_prefix
    source = sources[last]
    grid = patch_grid(images.shape[-2], images.shape[-1], source.shape[-1] - p)
    return Trace(regions=token_regions(source, p, grid).cpu(), tokens=source.shape[1] - p,
                 num_patches=grid[0] * grid[1],
                 method=runtime.method.name, budget=runtime.requested.describe(),
                 flops_ratio=_flops_ratio(runtime, state.schedule), depth=last + 1,
                 after={b: token_regions(sources[b], p, grid).cpu() for b in wanted},
                 tokens_after={b: sources[b].shape[1] - p for b in wanted})


def _trace_detr(model, runtime, images: torch.Tensor, blocks: Sequence[int], forward: Optional[Callable]) -> Trace:
    """:func:`trace` of a DETR: the sets of encoder tokens its layers ran on, over the feature map."""
    depth = len(runtime.layers)
    wanted = _checked_blocks(blocks, depth)
    with torch.no_grad():
        (forward or encode_images)(model, images)
    state = runtime.last_forward()
    B, N = state.valid.shape
    grid = patch_grid(images.shape[-2], images.shape[-1], N)
    positions = torch.arange(N, device=state.valid.device).expand(B, N)

    def kept(layer: int) -> torch.Tensor:
        idx, slot_valid = state.layer_sets[layer]
        mask = torch.zeros(B, N, dtype=torch.bool, device=idx.device).scatter(1, idx, slot_valid)
        return torch.where(mask, positions, -1).reshape(B, *grid).cpu()

    counts = [max(per_layer) for per_layer in zip(*state.kept_per_image)]
    if not blocks:  # the first layer of every cascade level before the last
        wanted = [layer for layer in range(depth - 1) if layer == 0 or counts[layer] != counts[layer - 1]]
        wanted = [layer for layer in wanted if counts[layer] != counts[-1]]
    return Trace(regions=kept(depth - 1), tokens=counts[-1], num_patches=N, method=runtime.method.name,
                 budget=runtime.budget.describe(), flops_ratio=None, depth=depth,
                 after={b: kept(b) for b in wanted}, tokens_after={b: counts[b] for b in wanted},
                 unit="encoder layer")


@dataclass
class Panel:
    """One crop or frame of a LLaVA call: its ``index`` among the image's crops / the video's
    frames, its ``picture[3, H, W]`` in [0, 1], the ``regions[rows, cols]`` drawn on it (see
    :func:`crop_regions`, :func:`frame_regions`) and a title."""

    index: int
    picture: torch.Tensor
    regions: torch.Tensor
    title: str


@dataclass
class LlavaTrace:
    """What one call of a LLaVA compressed with its own method (tokencorr, QuoTA) kept: ``rows[i]``
    the panels of its ``i``-th image / video (of ``modality``), the visual tokens before and after."""

    rows: List[List[Panel]]
    modality: str
    method: str
    budget: str
    tokens_before: int
    tokens_after: int


def crop_regions(kept: Sequence[int], merged: Sequence[Sequence[int]], grid: Tuple[int, int]) -> torch.Tensor:
    """One crop's ``grid`` of patches -> per patch the index (in output order) of the visual token that
    stands for it: ``kept`` patches each their own token, a ``merged`` ``[dropped, kept]`` patch the
    token of the patch it was folded into, -1 the dropped (and the patches the model left out)."""
    labels = torch.full((grid[0] * grid[1],), -1, dtype=torch.long)
    labels[torch.as_tensor(list(kept), dtype=torch.long)] = torch.arange(len(kept))
    if len(merged):
        pairs = torch.as_tensor([list(p) for p in merged], dtype=torch.long)
        labels[pairs[:, 0]] = labels[pairs[:, 1]]
    return labels.reshape(grid)


def frame_regions(after: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """One QuoTA frame resized (bilinear) to an ``after`` token grid, at ``size`` (rows, cols) cells
    over the frame: per cell, the token (row-major index in the resized grid) whose footprint holds
    the cell's centre -- each token a rectangle of the frame, finer than a patch when ``after`` is
    finer than the frame's grid; all -1 when the frame kept no token."""
    rows, cols = size
    if after[0] * after[1] == 0:
        return torch.full((rows, cols), -1, dtype=torch.long)
    r = ((torch.arange(rows) + 0.5) * after[0] / rows).long()
    c = ((torch.arange(cols) + 0.5) * after[1] / cols).long()
    return r[:, None] * after[1] + c[None, :]


#: the longest side, in cells, of a QuoTA frame's drawn grid (about a panel's pixels)
FRAME_CELLS = 224


def _picture(pixels: torch.Tensor) -> torch.Tensor:
    return display_pictures(pixels[None])[0]


def trace_llava(model, inputs: Dict, question=None) -> LlavaTrace:
    """Run one call of a LLaVA compressed with its own method (``model(**inputs, question=...)``,
    without gradients) and read back, from what the runtime recorded of this thread's call, which
    visual tokens of each crop (tokencorr: indices into the crop's patch grid; merged patches join
    the token they went into) or frame (QuoTA: the grid each frame was resized to) were kept."""
    from .runtimes.vlm import LlavaRuntime

    runtime = runtime_of(model)
    if not isinstance(runtime, LlavaRuntime) or runtime.tower is not None:
        raise TypeError("trace_llava draws a LLaVA compressed with tokencorr or quota; use trace / draw for ViTs, "
                        "DETRs and a ViT method inside a LLaVA's vision tower")
    if not getattr(runtime.adapter, "drawable", True):
        raise TypeError(f"trace_llava / draw do not draw a {runtime.adapter.family} (its tiles are not LLaVA's crops "
                        "and frames); vitcompress.stats(model) says what each tile kept")
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise TypeError("give the call's keyword arguments as a dict (input_ids, pixel_values, image_sizes, ...: "
                        "what the model's processor returns), as model(**inputs) takes them")
    modality = runtime.reduced_modality
    pixels = inputs.get("pixel_values" if modality == "image" else "pixel_values_videos")
    if pixels is None:
        raise ValueError(f"this call carries no {modality} pixels, the only visual tokens "
                         f"{runtime.method.name} reduces on this model; pass them in inputs")
    with torch.no_grad():
        model(**inputs, **({} if question is None else {"question": question}))
    stats = runtime.stats()
    vision = runtime.adapter.config.vision_config
    side = vision.image_size // vision.patch_size
    rows = []
    for u, unit in enumerate(stats[modality]):
        if runtime.method.unit == "crop":
            rows.append([Panel(crop["crop"], _picture(pixels[u] if pixels.dim() == 4 else pixels[u, crop["crop"]]),
                               crop_regions(crop["kept"], crop.get("merged", ()), (side, side)),
                               f"crop {crop['crop']}: {len(crop['kept'])}/{crop['patches']} kept")
                         for crop in unit["crops"]])
        else:
            panels = []
            for k, (frame, before) in enumerate(zip(unit["frames"], unit["frame_grids"])):
                after = tuple(unit["grid"][frame])
                picture = _picture(pixels[u] if pixels.dim() == 4 else pixels[u, k])
                scale = FRAME_CELLS / max(picture.shape[-2:])
                cells = (max(1, round(picture.shape[-2] * scale)), max(1, round(picture.shape[-1] * scale)))
                text = "dropped" if after[0] * after[1] == 0 else f"{after[0]}x{after[1]}"
                panels.append(Panel(k, picture, frame_regions(after, cells),
                                    f"frame {k}: {before[0]}x{before[1]} -> {text}"))
            rows.append(panels)
    return LlavaTrace(rows=rows, modality=modality, method=runtime.method.name, budget=stats["budget"],
                      tokens_before=stats["visual_tokens_before"], tokens_after=stats["visual_tokens_after"])


def _draw_llava(model, inputs, question, title):
    seen = trace_llava(model, inputs, question)
    panels = [[render(p.picture, p.regions, min_cell=1 if seen.method == "quota" else 16) for p in row]
              for row in seen.rows]
    titles = [[p.title for p in row] for row in seen.rows]
    what = ("coloured + outlined: merged patches · plain: patches kept · hatched grey: dropped"
            if seen.method != "quota" else
            "coloured + outlined: the tokens of each frame's resized grid · hatched grey: dropped frame")
    heading = (f"{seen.method}, {seen.budget}: {seen.tokens_after}/{seen.tokens_before} visual tokens"
               f" ({seen.modality} rows, one panel per {'crop' if seen.method != 'quota' else 'frame'})")
    return figure(panels, [], f"{title + ': ' if title else ''}{heading}\n{what}", panel_titles=titles)


# --------------------------------------------------------------------------- drawing


def group_colours(regions: torch.Tensor) -> Dict[int, int]:
    """A :data:`PALETTE` index for every merge group (a token standing for more than one patch) of
    one picture's ``regions[rows, cols]``, touching groups in different colours: greedy, largest group
    first, each taking the least used colour its neighbours do not have."""
    labels = regions.numpy()
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    groups = {int(i) for i, c in zip(ids, counts) if c > 1}
    touching: Dict[int, set] = {g: set() for g in groups}
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        for x, y in zip(a.ravel(), b.ravel()):
            if x != y and x in groups and y in groups:
                touching[int(x)].add(int(y))
                touching[int(y)].add(int(x))
    colour: Dict[int, int] = {}
    used = np.zeros(len(PALETTE), dtype=int)
    for g in sorted(groups, key=lambda g: (-int(counts[ids == g][0]), g)):
        taken = {colour[n] for n in touching[g] if n in colour}
        free = [c for c in range(len(PALETTE)) if c not in taken] or list(range(len(PALETTE)))
        colour[g] = min(free, key=lambda c: (used[c], c))
        used[colour[g]] += 1
    return colour


def render(picture, regions: torch.Tensor, min_cell: int = 16) -> np.ndarray:
    """One panel: ``picture`` (``[3, H, W]`` or ``[H, W, 3]``, values in [0, 1]) with ``regions[rows,
    cols]`` drawn on it -> an RGB array, each patch at least ``min_cell`` pixels wide. Merge groups
    are tinted (neighbours in different colours) and outlined in black; tokens that stand for one
    patch show the plain image inside a faint grid; pruned patches (-1) are hatched light grey."""
    picture = torch.as_tensor(np.asarray(picture, dtype=np.float32))
    if picture.shape[-1] == 3 and picture.shape[0] != 3:
        picture = picture.permute(2, 0, 1)
    rows, cols = regions.shape
    cell = max(min_cell, math.ceil(max(picture.shape[1] / rows, picture.shape[2] / cols)))
    image = torch.nn.functional.interpolate(picture[None], size=(rows * cell, cols * cell), mode="bilinear",
                                            align_corners=False, antialias=True)[0].clamp(0, 1)
    out = image.permute(1, 2, 0).numpy().copy()
    labels = regions.repeat_interleave(cell, 0).repeat_interleave(cell, 1).numpy()
    colours = group_colours(regions)
    pruned = labels < 0
    grey = out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    ys, xs = np.indices(labels.shape)
    hatch = (ys + xs) % 6 == 0  # diagonal lines: pruned stays readable on grey pictures too
    out[pruned] = np.where(hatch[pruned], 0.62, 0.78 + 0.12 * (grey[pruned] - 0.5))[:, None]
    in_group = np.isin(labels, list(colours))
    if colours:
        tint = np.zeros_like(out)
        for label, c in colours.items():
            tint[labels == label] = PALETTE[c]
        out[in_group] = 0.55 * out[in_group] + 0.45 * tint[in_group]
    strong = np.zeros(labels.shape, dtype=bool)
    faint = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        first = (slice(None, -1), slice(None)) if axis == 0 else (slice(None), slice(None, -1))
        second = (slice(1, None), slice(None)) if axis == 0 else (slice(None), slice(1, None))
        edge = labels[first] != labels[second]
        group_edge = edge & (in_group[first] | in_group[second])
        strong[first] |= group_edge
        strong[second] |= group_edge
        faint[first] |= edge & ~group_edge
    out[faint & ~strong] = 0.6 * out[faint & ~strong] + 0.4
    out[strong] = 0.08
    return out


def display_pictures(images: torch.Tensor) -> torch.Tensor:
    """Model inputs ``[B, C, H, W]`` (normalised) -> pictures to draw on, ``[B, 3, H, W]`` in [0, 1]:
    each image stretched to its own range (the normalisation undone up to scale), grey made RGB."""
    x = images.detach().float().cpu()
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - low) / (high - low).clamp_min(1e-8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def figure(panels: List[List[np.ndarray]], column_titles: Sequence[str], title: str,
           panel_titles: Optional[List[List[str]]] = None):
    """A matplotlib ``Figure`` (Agg, no pyplot state) of ``panels[row][col]`` (rows may differ in
    length), a title per column over the top row -- or ``panel_titles[row][col]`` over every panel --
    and ``title`` over all; its size in pixels is fixed by :data:`PANEL_INCHES`,
    :data:`HEADER_INCHES` and :data:`DPI`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = len(panels), max(len(row) for row in panels)
    width, height = cols * PANEL_INCHES, rows * PANEL_INCHES + HEADER_INCHES
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    pad = 0.06
    side = PANEL_INCHES - 2 * pad - (0.25 if panel_titles else 0.0)  # room for each panel's own title
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            left = (c * PANEL_INCHES + pad) / width
            bottom = ((rows - 1 - r) * PANEL_INCHES + pad) / height
            ax = fig.add_axes((left, bottom, (PANEL_INCHES - 2 * pad) / width, side / height))
            ax.imshow(panel, interpolation="nearest")
            ax.set_axis_off()
            if panel_titles:
                ax.set_title(panel_titles[r][c], fontsize=8, pad=3)
            elif r == 0:
                ax.set_title(column_titles[c], fontsize=9, pad=4)
    fig.suptitle(title, fontsize=10.5, y=1 - 0.08 / height, va="top")
    return fig


LEGEND = "coloured + outlined: merged tokens · plain: tokens of one patch · hatched grey: pruned"
DETR_LEGEND = "plain: encoder tokens the layer runs on · hatched grey: tokens it passes through unchanged"


def _tokens_title(tokens: int, patches: int) -> str:
    return f"{tokens}/{patches} tokens left"


def draw(model, images: torch.Tensor, blocks: Sequence[int] = (), pictures: Optional[torch.Tensor] = None,
         forward: Optional[Callable] = None, title: Optional[str] = None, question=None):
    """A figure of what the compressed ``model`` keeps of each image of the batch: the input, the
    tokens after each block in ``blocks`` (0-based) and after the last block. ``pictures`` (``[B, 3,
    H, W]`` in [0, 1]) are drawn on instead of the stretched inputs; ``title`` (e.g. the model's name)
    goes before the method, budget and FLOPs in the heading.

    A LLaVA compressed with tokencorr or quota: ``images`` is the call's keyword arguments (a dict,
    with ``question`` for QuoTA); a row per image / video, a panel per crop / frame (:func:`trace_llava`)."""
    if isinstance(images, dict):
        if blocks or pictures is not None or forward is not None:
            raise TypeError("a LLaVA's crops and frames are drawn from the call's own pixels after its vision tower: "
                            "give only the inputs dict (and question=, title=), not blocks / pictures / forward")
        return _draw_llava(model, images, question, title)
    seen = trace(model, images, blocks, forward)
    pictures = display_pictures(images) if pictures is None else pictures.detach().float().cpu()
    panels = [[p.permute(1, 2, 0).numpy()] + [render(p, seen.after[b][i]) for b in sorted(seen.after)]
              + [render(p, seen.regions[i])] for i, p in enumerate(pictures)]
    titles = ["input"] + [f"{seen.unit} {b}\n{_tokens_title(seen.tokens_after[b], seen.num_patches)}"
                          for b in sorted(seen.after)]
    titles.append(f"{seen.unit} {seen.depth - 1} (last)\n{_tokens_title(seen.tokens, seen.num_patches)}")
    heading = f"{seen.method}, {seen.budget}" + ("" if seen.flops_ratio is None else
                                                   f": {seen.flops_ratio:.2f}x the FLOPs")
    legend = DETR_LEGEND if seen.flops_ratio is None else LEGEND
    return figure(panels, titles, f"{title + ': ' if title else ''}{heading}\n{legend}")


def compare(model, images: torch.Tensor, methods: Sequence[str] = ("tome", "pitome", "zero_tprune"), *,
            flops: Optional[float] = None, keep: Optional[float] = None, r=None,
            pictures: Optional[torch.Tensor] = None, forward: Optional[Callable] = None,
            title: Optional[str] = None):
    """A figure of several methods side by side at the same budget (one of ``flops``, ``keep``,
    ``r``) on each image of the batch: ``model`` (uncompressed) is compressed with each method in
    turn, traced, and restored exactly. ``pictures`` and ``title`` as in :func:`draw`."""
    from . import api

    if runtime_of(model) is not None:
        raise ValueError("compare() compresses the model with each method itself: pass it uncompressed "
                         "(vitcompress.restore(model) first), or draw its own compression with draw()")
    budget = {k: v for k, v in (("flops", flops), ("keep", keep), ("r", r)) if v is not None}
    traces = []
    for method in methods:
        api.compress(model, method, **budget)
        try:
            traces.append(trace(model, images, forward=forward))
        finally:
            api.restore(model)
    pictures = display_pictures(images) if pictures is None else pictures.detach().float().cpu()
    panels = [[p.permute(1, 2, 0).numpy()] + [render(p, t.regions[i]) for t in traces]
              for i, p in enumerate(pictures)]
    titles = ["input"] + [f"{t.method}" + ("" if t.flops_ratio is None else f": {t.flops_ratio:.2f}x FLOPs")
                          + f"\n{_tokens_title(t.tokens, t.num_patches)}" for t in traces]
    budget_text = ", ".join(f"{k}={v}" for k, v in budget.items()) or "default budgets"
    return figure(panels, titles, f"{title + ': ' if title else ''}same budget, {budget_text}\n{LEGEND}")
