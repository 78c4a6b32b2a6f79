"""Accuracy of a classifier on labelled images, shared by ``vitcompress bench`` and the eval scripts,
and the evaluation pieces that work across ``torchrun`` ranks (see :mod:`vitcompress.evaluation.distributed`):
accuracy as counts that add up over shards, COCO detections gathered in dataset order, images/s
per rank and summed."""
import contextlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .distributed import Context, shard


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CPU, float16 on CUDA, nothing when ``amp`` is off."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size], labels[i:i + batch_size]


def predict(model: torch.nn.Module, loader: Iterable, device: torch.device, amp: bool = False,
            progress: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-5 class indices ``[N, 5]`` (fewer if the model has fewer classes) and the labels."""
    tops, labels = [], []
    with torch.inference_mode():
        for x, y in tqdm(loader, desc=progress, disable=progress is None, leave=False):
            with autocast(device, amp):
                logits = model(x.to(device, non_blocking=True))
            k = min(5, logits.shape[-1])
            tops.append(logits.float().topk(k, dim=-1).indices.cpu())
            labels.append(y)
    return torch.cat(tops), torch.cat(labels)


def hit_counts(top: torch.Tensor, labels: torch.Tensor) -> Dict[str, int]:
    """Top-1 and top-5 hits and the number of images: integers, so shards add up exactly."""
    hit = top == labels[:, None]
    return {"top1": int(hit[:, 0].sum()), "top5": int(hit.any(dim=1).sum()), "images": int(labels.numel())}


def rates(counts: Dict[str, int]) -> Dict[str, float]:
    """Top-1 / top-5 accuracy from :func:`hit_counts` (summed over shards or not)."""
    if counts["images"] == 0:
        raise ValueError("accuracy of no images: the data set (or this shard) is empty")
    return {"top1": counts["top1"] / counts["images"], "top5": counts["top5"] / counts["images"]}


def accuracy(top: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    return rates(hit_counts(top, labels))


class ReferenceTransform:
    """PIL image -> input of the embedded reference model (grayscale 28x28, then its preprocess)."""

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        from . import reference_model as reference
        raw = pil_to_tensor(image.convert("L").resize((28, 28)))
        return reference.preprocess(raw)[0]


def model_transform(model: torch.nn.Module, reference_model: bool = False):
    """The model's own eval transform: timm's data config, or the reference model's preprocessing."""
    if reference_model:
        return ReferenceTransform()
    import timm.data

    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


def imagefolder_loader(data_dir: str, model: torch.nn.Module, batch_size: int, workers: int = 2,
                       max_images: Optional[int] = None, reference_model: bool = False,
                       ctx: Optional[Context] = None, labelled: Optional[bool] = True):
    """A DataLoader over an ImageFolder with the model's own eval transform (:func:`model_transform`),
    its folders matched to the model's classes by name (:func:`~vitcompress.evaluation.folders.image_dataset`;
    ``labelled=None`` also takes a folder of unlabelled images); with a
    :class:`~vitcompress.evaluation.distributed.Context`, over this rank's shard of the (``max_images``) images."""
    from .folders import class_names_of, image_dataset, num_classes_of

    dataset = image_dataset(data_dir, model_transform(model, reference_model),
                            class_names_of(model, reference_model), num_classes_of(model), labelled=labelled)
    if max_images is not None and max_images < len(dataset):
        step = len(dataset) / max_images  # spread over all classes, deterministic
        dataset = torch.utils.data.Subset(dataset, [int(i * step) for i in range(max_images)])
    if ctx is not None:
        dataset = shard(dataset, ctx)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def merge_detections(per_rank: Sequence[List[Dict]], image_ids: Sequence[int]) -> List[Dict]:
    """COCO result dicts of all ranks in the order of ``image_ids`` (each image's own detections
    keep their order), as one process evaluating every image would have produced them."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    results = [r for part in per_rank for r in part]
    unknown = {r["image_id"] for r in results} - set(position)
    if unknown:
        raise ValueError(f"merge_detections: detections for image ids {sorted(unknown)[:5]} not in the data set")
    return sorted(results, key=lambda r: position[r["image_id"]])  # stable


def gather_detections(results: List[Dict], image_ids: Sequence[int], ctx: Context) -> Optional[List[Dict]]:
    """Every rank's COCO detections on rank 0, in dataset order; None on the other ranks."""
    per_rank = ctx.gather(results)
    return None if per_rank is None else merge_detections(per_rank, image_ids)


def throughput_over_ranks(images_per_s: float, ctx: Context) -> Optional[Dict[str, object]]:
    """``images_per_s`` (the sum over ranks, which ran at the same time) and
    ``images_per_s_per_rank`` on rank 0; None elsewhere."""
    per_rank = ctx.gather(float(images_per_s))
    return None if per_rank is None else {"images_per_s": sum(per_rank), "images_per_s_per_rank": per_rank}
