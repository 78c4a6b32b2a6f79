"""The one model loader of the command line and the evaluation scripts.

``load_model("reference")`` gives the embedded reference ViT (trained on Fashion-MNIST, shipped
with the package) and its shipped test images; any other name is a timm model, with random
weights, timm's pretrained weights (``pretrained=True``, needs the Hugging Face hub) or a local
checkpoint. Where a command takes them (``libraries=True``), ``hf:NAME_OR_DIR`` is a transformers
model (``AutoModel.from_pretrained``: a hub name, read from the local cache offline, or a directory
written by ``save_pretrained``) and ``open_clip:ARCH[/TAG_OR_FILE]`` an open_clip model (random
weights without a tag). ``check_model_name`` validates a name without building anything, so a command line
can refuse a typo before it starts a long run. Failures name the fix: an unknown name suggests
close timm names, an unreachable hub says how to run offline.
"""
import difflib
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple

__all__ = ["REFERENCE", "LoadedModel", "WeightsUnavailable", "check_model_name", "load_model", "reference_input_size",
           "display_name"]

#: The name of the embedded reference model.
REFERENCE = "reference"

#: Prefixes of the model names that name another library's model (``libraries=True``).
HF, OPEN_CLIP = "hf:", "open_clip:"

#: Short names of the architectures the benchmarks use, for tables and plot titles.
_DISPLAY = {"deit_small_patch16_224": "DeiT-S/224", "deit_tiny_patch16_224": "DeiT-Ti/224",
            "deit_base_patch16_224": "DeiT-B/224", "vit_base_patch16_224": "ViT-B/16-224",
            REFERENCE: "reference ViT (Fashion-MNIST)"}


class WeightsUnavailable(OSError):
    """Pretrained weights could not be fetched (no network, hub unreachable, not in the cache)."""


@dataclass
class LoadedModel:
    """A model in eval mode on the CPU, what its weights are, its input size ``(C, H, W)`` and,
    for the reference model, its shipped test images (preprocessed) and labels."""

    name: str
    model: Any  # torch.nn.Module (torch is imported only when a model is built)
    weights: str  # "embedded trained weights" | "random weights" | "pretrained weights" | "checkpoint PATH"
    input_size: Tuple[int, int, int]
    images: Any = None  # torch.Tensor [N, C, H, W]
    labels: Any = None  # torch.Tensor [N]
    mean: Optional[Tuple[float, ...]] = None  # the normalisation the model was trained with, where known
    std: Optional[Tuple[float, ...]] = None


def display_name(name: str) -> str:
    """``"DeiT-S/224"`` for ``deit_small_patch16_224``; other names as given."""
    return _DISPLAY.get(name, name)


def reference_input_size() -> Tuple[int, int, int]:
    """Input size of the reference model without loading it: 28x28 Fashion-MNIST, zero padded."""
    from . import reference_model

    side = 28 + 2 * reference_model.PAD
    return (1, side, side)


def check_model_name(name: str, pretrained: bool = False, libraries: bool = False) -> None:
    """Raise ``ValueError`` naming the fix if ``name`` is neither ``"reference"`` nor a timm model
    name (nor, with ``libraries``, an ``hf:`` / ``open_clip:`` name), or if ``pretrained`` is asked
    of the reference model. Builds nothing."""
    if libraries and name.startswith((HF, OPEN_CLIP)):
        _check_library_name(name, pretrained)
        return
    if name == REFERENCE:
        if pretrained:
            raise ValueError("--pretrained applies to timm models; the reference model ships its own trained "
                             "weights (drop --pretrained)")
        return
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    others = (f", a timm model name, {HF}NAME_OR_DIR (transformers) or {OPEN_CLIP}ARCH/TAG (open_clip)"
              if libraries else " or a timm model name")
    raise ValueError(f"unknown model {name!r}: give {REFERENCE!r} (the embedded model){others}; {hint}list "
                     f"timm's with: python -c \"import timm; print(timm.list_models('*vit*'))\"")


def _check_library_name(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"--pretrained applies to timm names; {name} loads the weights its name gives "
                         f"({OPEN_CLIP}ARCH without a tag: random weights): drop --pretrained")
    if name.startswith(HF):
        if not name[len(HF):]:
            raise ValueError(f"{name!r}: give a transformers model after {HF}, e.g. {HF}facebook/dinov2-small or "
                             f"{HF}DIR (a directory written by save_pretrained)")
        import transformers  # noqa: F401  (ImportError: the fix is pip install transformers)
        return
    import open_clip

    arch = name[len(OPEN_CLIP):].split("/", 1)[0]
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown open_clip architecture {arch!r} in {name!r}: {hint}list them with: "
                         "python -c \"import open_clip; print(open_clip.list_models())\"")


def _unreachable(err: BaseException) -> bool:
    """Whether a library's load failed because the hub could not be reached (nothing cached)."""
    text = str(err).lower()
    return _is_download_error(err) or any(s in text for s in ("couldn't connect", "failed to download",
                                                                "cannot find the requested files"))


def _load_hf(ident: str) -> LoadedModel:
    """``hf:NAME_OR_DIR`` through ``AutoModel`` (its image processor's size and normalisation where
    one is saved with it, else the config's image size and ImageNet's normalisation)."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(ident)
    except Exception as err:
        if not os.path.isdir(ident) and _unreachable(err):
            raise WeightsUnavailable(
                f"cannot load {HF}{ident}: the Hugging Face hub is unreachable and it is not in the local cache "
                f"({type(err).__name__}). Fix: on a machine with a network save it with AutoModel.from_pretrained("
                f"{ident!r}).save_pretrained(DIR) (and its AutoImageProcessor) and pass --model {HF}DIR, or point "
                "HF_HOME at a cache that holds it") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load {HF}{ident} with transformers.AutoModel: {first}") from None
    config = getattr(model.config, "vision_config", model.config)
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    mean = std = None
    try:
        processor = AutoImageProcessor.from_pretrained(ident)
    except Exception:  # none saved with the model (a save_pretrained directory), or offline
        processor = None
    if processor is not None:
        crop = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
        height, width = crop.get("height", height), crop.get("width", width)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    channels = getattr(config, "num_channels", 3)
    return LoadedModel(HF + ident, model.eval(), "transformers weights", (channels, height, width), mean=mean, std=std)


def _load_open_clip(spec: str) -> LoadedModel:
    """``open_clip:ARCH[/TAG_OR_FILE]``: the architecture with a pretrained tag's weights (hub or its
    cache), a local checkpoint file's, or random ones without a tag."""
    import open_clip

    arch, _, tag = spec.partition("/")
    try:
        model = open_clip.create_model(arch, pretrained=tag or None)
    except Exception as err:
        if tag and not os.path.isfile(tag) and _unreachable(err):
            raise WeightsUnavailable(
                f"cannot load {OPEN_CLIP}{spec}: the Hugging Face hub is unreachable and the weights of {tag!r} "
                f"are not in the local cache ({type(err).__name__}). Fix: download the checkpoint on a machine "
                f"with a network and pass --model {OPEN_CLIP}{arch}/FILE, or point HF_HOME at a cache that holds "
                f"it ({OPEN_CLIP}{arch} without a tag: random weights)") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load {OPEN_CLIP}{spec} with open_clip.create_model: {first}") from None
    size = model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    weights = f"open_clip weights {tag}" if tag else "random weights"
    return LoadedModel(OPEN_CLIP + spec, model.eval(), weights, (3, height, width),
                       mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                       std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)))


def _is_download_error(err: BaseException) -> bool:
    if isinstance(err, (OSError, ConnectionError, TimeoutError)):
        return True
    module = type(err).__module__ or ""
    return module.split(".")[0] in ("huggingface_hub", "requests", "urllib3", "urllib", "httpx")


def load_model(name: str = REFERENCE, *, pretrained: bool = False, checkpoint: Optional[str] = None,
               num_classes: Optional[int] = None, img_size: Optional[int] = None,
               num_images: Optional[int] = None, libraries: bool = False) -> LoadedModel:
    """Build ``name`` in eval mode on the CPU.

    ``"reference"``: the embedded model and the first ``num_images`` shipped test images (all
    3,000 by default; 0 for none). Otherwise a timm model: random weights by default,
    ``pretrained=True`` for timm's weights (downloaded from the Hugging Face hub, or read from its
    cache), or ``checkpoint`` (a local ``state_dict``, or a dict holding one under
    ``"state_dict"``); ``num_classes`` and ``img_size`` are passed to ``timm.create_model``.

    ``libraries``: also ``hf:NAME_OR_DIR`` and ``open_clip:ARCH[/TAG_OR_FILE]`` (see the module).

    Raises ``ValueError`` for an unknown name or options the model does not take, and
    :class:`WeightsUnavailable` when pretrained weights cannot be fetched.
    """
    check_model_name(name, pretrained, libraries)
    if libraries and name.startswith((HF, OPEN_CLIP)):
        if checkpoint or num_classes is not None or img_size is not None:
            raise ValueError(f"{name}: --checkpoint / --num-classes / --img-size apply to timm models")
        return _load_hf(name[len(HF):]) if name.startswith(HF) else _load_open_clip(name[len(OPEN_CLIP):])
    if name == REFERENCE:
        if checkpoint or num_classes is not None:
            raise ValueError("the reference model ships its own weights and 10 classes: --checkpoint / "
                             "--num-classes apply to timm models")
        size = reference_input_size()
        if img_size is not None and img_size != size[-1]:
            raise ValueError(f"--img-size {img_size}: the reference model takes {size[-1]}x{size[-1]} images "
                             "(drop --img-size)")
        from . import reference_model

        model, images, labels = reference_model.load(num_images=num_images)
        return LoadedModel(name, model, "embedded trained weights", size, images, labels)

    import timm
    import torch

    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    use_hub = pretrained and not checkpoint
    try:
        model = timm.create_model(name, pretrained=use_hub, **kwargs)
    except Exception as err:
        if use_hub and _is_download_error(err):
            raise WeightsUnavailable(
                f"cannot fetch the pretrained weights of {name!r} (Hugging Face hub unreachable and not in the "
                f"local cache: {type(err).__name__}). Fix: drop --pretrained (random weights: FLOPs and speed do "
                "not depend on them), copy the weights into the hub cache (HF_HOME) from a machine with a "
                "network, or load a local state_dict (--checkpoint FILE in experiments/evaluation/eval_imagenet.py)") from None
        if use_hub and "pretrained" in str(err).lower():
            raise ValueError(f"timm has no pretrained weights for {name!r} ({err}); drop --pretrained or choose "
                             "a model with weights: timm.list_models(pretrained=True)") from None
        raise ValueError(f"cannot create timm model {name!r}: {err}") from None
    weights = "pretrained weights" if use_hub else "random weights"
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"--checkpoint {checkpoint} does not fit {name!r} ({first}); check the model name "
                             "and --num-classes") from None
        weights = f"checkpoint {checkpoint}"
    channels, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    if img_size is not None:
        height = width = img_size
    return LoadedModel(name, model.eval(), weights, (channels, height, width))
