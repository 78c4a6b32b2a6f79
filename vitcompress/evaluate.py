"""Accuracy of a classifier on labelled images, shared by ``vitcompress bench`` and the eval scripts."""
import contextlib
from typing import Dict, Iterable, Optional, Tuple

import torch
from tqdm.auto import tqdm


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


def accuracy(top: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    hit = top == labels[:, None]
    return {"top1": hit[:, 0].float().mean().item(), "top5": hit.any(dim=1).float().mean().item()}


class ReferenceTransform:
    """PIL image -> input of the embedded reference model (grayscale 28x28, then its preprocess)."""

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        from . import reference_model as reference
        raw = pil_to_tensor(image.convert("L").resize((28, 28)))
        return reference.preprocess(raw)[0]


def imagefolder_loader(data_dir: str, model: torch.nn.Module, batch_size: int, workers: int = 2,
                       max_images: Optional[int] = None, reference_model: bool = False):
    """A DataLoader over an ImageFolder with the model's own eval transform (timm's data config,
    or the reference model's preprocessing)."""
    import timm.data
    from torchvision.datasets import ImageFolder

    if reference_model:
        transform = ReferenceTransform()
    else:
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    dataset = ImageFolder(data_dir, transform=transform)
    if max_images is not None and max_images < len(dataset):
        step = len(dataset) / max_images  # spread over all classes, deterministic
        dataset = torch.utils.data.Subset(dataset, [int(i * step) for i in range(max_images)])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
