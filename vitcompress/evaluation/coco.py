"""COCO-format detection data for DETR-style models: loading and batching images with their boxes,
FCOS-style foreground targets (to train Focus-DETR's scorer), DETR outputs -> COCO results, and
bbox AP with pycocotools (``pip install -e ".[coco]"``).

Conventions: images are resized as DETR does (shortest side ``size``, longest at most ``max_size``),
normalised with the ImageNet mean/std and zero-padded bottom/right to the batch's largest size,
with a ``pixel_mask`` (1 = real pixel). A model's class index is the COCO ``category_id`` (the
convention of transformers' COCO DETR checkpoints, whose ``id2label`` keeps COCO's id gaps).
"""
import contextlib
import io
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# FCOS's object-size ranges for its five levels (strides 8-128): a box is assigned to a level when
# the largest distance from a location to its sides falls in the level's range.
FCOS_RANGES = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, math.inf))


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:
        raise ImportError("COCO evaluation needs pycocotools: pip install -e \".[coco]\"") from err
    return COCO, COCOeval


def load_coco(annotation_file: str):
    """A pycocotools ``COCO`` index of ``annotation_file``, without its loading chatter."""
    COCO, _ = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(annotation_file)


def resized_shape(height: int, width: int, size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """DETR's resize: the shorter side to ``size`` unless the longer would exceed ``max_size``."""
    scale = size / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO-format annotation file, resized and normalised for a DETR.

    Each item is ``(pixels [3, h, w], target)``; ``target`` has ``image_id``, ``orig_size`` and
    ``size`` (``(h, w)``), ``boxes [M, 4]`` (x0, y0, x1, y1 in resized pixels, crowd boxes left out)
    and ``labels [M]`` (category ids).
    """

    def __init__(self, image_dir: str, annotation_file: str, size: int = 800, max_size: Optional[int] = 1333,
                 max_images: Optional[int] = None):
        self.coco = load_coco(annotation_file)
        self.image_dir = image_dir
        self.size, self.max_size = size, max_size
        self.ids = sorted(self.coco.imgs)
        if max_images is not None:
            self.ids = self.ids[:max_images]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms.functional import normalize, pil_to_tensor

        image_id = self.ids[i]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            new_h, new_w = resized_shape(h, w, self.size, self.max_size)
            img = img.resize((new_w, new_h), Image.BILINEAR)
            pixels = normalize(pil_to_tensor(img).float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes *= torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        target = {"image_id": image_id, "orig_size": (h, w), "size": (new_h, new_w), "boxes": boxes, "labels": labels}
        return pixels, target


def collate(batch):
    """``(pixel_values [B, 3, H, W], pixel_mask [B, H, W], targets)``, zero-padded bottom/right."""
    H = max(p.shape[1] for p, _ in batch)
    W = max(p.shape[2] for p, _ in batch)
    pixel_values = torch.zeros(len(batch), 3, H, W)
    pixel_mask = torch.zeros(len(batch), H, W, dtype=torch.int64)
    for i, (p, _) in enumerate(batch):
        pixel_values[i, :, : p.shape[1], : p.shape[2]] = p
        pixel_mask[i, : p.shape[1], : p.shape[2]] = 1
    return pixel_values, pixel_mask, [t for _, t in batch]


def loader(dataset: CocoDetection, batch_size: int, workers: int = 2, shuffle: bool = False):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       collate_fn=collate)


def fcos_assign(boxes: torch.Tensor, shapes: Sequence[Tuple[int, int]], strides: Sequence[float],
                ranges: Optional[Sequence[Tuple[float, float]]] = None) -> List[torch.Tensor]:
    """FCOS-style assignment of feature locations to ground-truth boxes.

    Location ``(i, j)`` of a level with stride ``s`` sits at pixel ``(j * s + s // 2, i * s + s // 2)``.
    It is positive for a box when it lies strictly inside the box and the largest of its distances
    to the box's four sides is in the level's range ``(lo, hi]``; where several boxes qualify, the
    smallest (by area) wins. ``boxes[M, 4]`` are x0, y0, x1, y1 pixels. ``ranges`` defaults to
    ``(0, inf)`` for a single level (every box fits, as for DETR's one level) and FCOS's ranges for
    several, the last level's open-ended (as FCOS's coarsest level takes every larger box). Returns,
    per level, ``[H, W]`` indices of the assigned box, -1 for background.
    """
    if ranges is None:
        ranges = list(FCOS_RANGES[: len(shapes)])
        ranges[-1] = (0.0 if len(shapes) == 1 else ranges[-1][0], math.inf)
    if not len(shapes) == len(strides) == len(ranges):
        raise ValueError(f"fcos_assign: {len(shapes)} shapes, {len(strides)} strides and {len(ranges)} ranges; "
                         "give one of each per level")
    if boxes.shape[0] == 0:
        return [torch.full((H, W), -1, dtype=torch.int64) for H, W in shapes]
    out = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for (H, W), s, (lo, hi) in zip(shapes, strides, ranges):
        ys = torch.arange(H, dtype=torch.float32) * s + int(s) // 2
        xs = torch.arange(W, dtype=torch.float32) * s + int(s) // 2
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        x, y = x.reshape(-1, 1), y.reshape(-1, 1)
        ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=-1)  # [HW, M, 4]
        inside = ltrb.amin(dim=-1) > 0
        reach = ltrb.amax(dim=-1)
        fits = inside & (reach > lo) & (reach <= hi)
        cost = torch.where(fits, area.expand_as(fits), torch.full_like(fits, math.inf, dtype=torch.float32))
        best = cost.argmin(dim=1)  # the smallest qualifying box; the first of equal areas
        best = torch.where(fits.any(dim=1), best, torch.full_like(best, -1))
        out.append(best.reshape(H, W))
    return out


def foreground_targets(targets: List[Dict], feature_shape: Tuple[int, int], image_shape: Tuple[int, int],
                       feature_mask: torch.Tensor) -> torch.Tensor:
    """``[B, H*W]`` 0/1 FCOS foreground targets for a DETR's single feature level of a padded batch
    (``image_shape`` the padded input size). The stride is the backbone's, a power of two: input
    size / feature size rounded to one, since a CNN's feature map has ``ceil(size / stride)``
    locations (1066 px at stride 32 give 34, a ratio of 31.4)."""
    H, W = feature_shape
    stride = 2 ** round(math.log2(image_shape[1] / W))
    rows = [(fcos_assign(t["boxes"], [(H, W)], [stride])[0] >= 0).reshape(-1) for t in targets]
    return torch.stack(rows).float().to(feature_mask.device) * feature_mask.reshape(len(targets), -1).float()


def detections(logits: torch.Tensor, pred_boxes: torch.Tensor, targets: List[Dict]) -> List[Dict]:
    """DETR outputs -> COCO result dicts, every query kept (as DETR's evaluation does): score and
    label from the best real class, boxes scaled from normalised (cx, cy, w, h) to original pixels."""
    prob = logits.float().softmax(dim=-1)[..., :-1]
    scores, labels = prob.max(dim=-1)
    results = []
    for b, t in enumerate(targets):
        h, w = t["orig_size"]
        cx, cy, bw, bh = pred_boxes[b].float().unbind(-1)
        xywh = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h], dim=-1)
        for score, label, box in zip(scores[b].tolist(), labels[b].tolist(), xywh.tolist()):
            results.append({"image_id": t["image_id"], "category_id": label, "bbox": box, "score": score})
    return results


def bbox_ap(coco_gt, results: List[Dict], image_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """COCO bbox ``AP`` (IoU .50:.95), ``AP50`` and ``AP75`` of ``results`` against ``coco_gt``."""
    _, COCOeval = _pycocotools()
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}


def check_labels(coco_gt, num_labels: int) -> None:
    """Fail early when the annotations use category ids the model cannot predict."""
    too_high = sorted(c for c in coco_gt.cats if c >= num_labels)
    if too_high:
        raise ValueError(f"the annotations use category id(s) {too_high[:5]} but the model has {num_labels} classes; "
                         "a model's class index is read as the COCO category_id (as in transformers' COCO DETR "
                         "checkpoints), so remap the annotations' ids or use a model trained on them")


def load_detr(model: Optional[str] = None, pretrained: bool = False, config: Optional[str] = None,
              checkpoint: Optional[str] = None):
    """A ``DetrForObjectDetection`` in eval mode: a transformers name with ``pretrained`` (hub
    weights, needs a network), a config (name, directory or JSON file) with random weights, or a
    local ``checkpoint`` (a ``save_pretrained`` directory, or a state_dict file loaded into the
    model built from ``config`` / ``model``)."""
    from transformers import DetrConfig, DetrForObjectDetection

    # Random or local weights never fetch the backbone's ImageNet weights (transformers 4.x configs
    # default to use_pretrained_backbone=True, which downloads them).
    if checkpoint is not None and os.path.isdir(checkpoint):
        config = DetrConfig.from_pretrained(checkpoint, use_pretrained_backbone=False)
        return DetrForObjectDetection.from_pretrained(checkpoint, config=config).eval()
    if model is None and config is None:
        raise ValueError("give --model NAME (with --pretrained for its weights), --config CONFIG, "
                         "or --checkpoint DIR (a save_pretrained directory)")
    if pretrained and checkpoint is None:
        if model is None:
            raise ValueError("--pretrained needs --model NAME (a transformers hub name)")
        return DetrForObjectDetection.from_pretrained(model).eval()
    net = DetrForObjectDetection(DetrConfig.from_pretrained(config or model, use_pretrained_backbone=False))
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            state = state.get("state_dict", state.get("model", state))
        net.load_state_dict(state)
    return net.eval()
