"""Checks written for the mutants of the mutation check (docs/contributing.md) that no other test
noticed: each asserts the method's definition on a case where the mutant differs, computed here."""
import math

import torch

from vitcompress.methods import quota
from vitcompress.testing import ramp_scorer

# ---------------------------------------------------------------- QuoTA


def test_quota_grid_shape_on_extreme_aspects_and_empty_shares():
    """h' = round(sqrt(n h / w)) clamped to [1, n], w' = n // h'; nothing at all for n <= 0."""
    for h, w, n in [(1, 40, 20), (40, 1, 20), (7, 5, 35), (3, 4, 1), (2, 30, 3), (24, 24, 100)]:
        rows = min(n, max(1, round(math.sqrt(n * h / w))))
        assert quota.grid_shape(h, w, n) == (rows, n // rows), (h, w, n)
    assert quota.grid_shape(1, 40, 20) == (1, 20) and quota.grid_shape(40, 1, 20) == (20, 1)
    assert quota.grid_shape(4, 4, 0) == (0, 0) and quota.grid_shape(4, 4, -3) == (0, 0)


def test_quota_reduce_video_on_non_square_frames_is_the_formula():
    """The budget is keep x the video's h*w tokens; each frame's grid keeps its own h:w aspect."""
    grids = [torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    frames = torch.zeros(3, 3, 8, 8)
    tokens, report = quota.QuoTA().reduce_video(frames, grids, 0.5, "q?", {"scorer": ramp_scorer, "tokenizer": None})
    budget = int(0.5 * 3 * 6 * 4)
    assert report["budget"] == budget == 36
    probs = [0.1, 0.55, 1.0]
    squares = [(100 * p) ** 2 for p in probs]
    alloc = [int(budget * s / sum(squares)) for s in squares]
    assert report["allocation"] == alloc
    shapes = []
    for n in alloc:
        rows = min(n, max(1, round(math.sqrt(n * 6 / 4)))) if n > 0 else 0
        shapes.append((rows, n // rows) if n > 0 else (0, 0))
    assert [tuple(s) for s in report["grid"]] == shapes
    assert report["frame_tokens"] == [h * w for h, w in shapes]
    for t, g, (h, w) in zip(tokens, grids, shapes):
        want = torch.nn.functional.interpolate(g.permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                               align_corners=False)[0].permute(1, 2, 0).reshape(-1, 3) if h else g[:0, 0]
        torch.testing.assert_close(t, want)
