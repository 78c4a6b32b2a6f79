"""The runtimes an ONNX file is checked in (onnxruntime, OpenVINO) and the check itself: the file's
outputs against the PyTorch model's on the same inputs."""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .checks import require
from .program import Inference

#: Runtimes ``export_onnx`` checks the file in.
RUNTIMES = ("onnxruntime", "openvino")


def ort_session(path: str, providers: Optional[Sequence[str]] = None):
    """An onnxruntime ``InferenceSession`` for ``path`` (CPU by default) using as many intra-op
    threads as torch does, so that comparisons with PyTorch are like for like."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    # Idle threads that spin would steal the cores from whatever runs next (a PyTorch model timed
    # in the same loop): they sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def verify_onnx(session, model: nn.Module, inputs: torch.Tensor, batch_size: Optional[int] = None) -> Dict[str, Any]:
    """Run ``inputs`` through the onnxruntime ``session`` (or the path of a model file) and through
    ``model``, in chunks of ``batch_size``. Returns ``images``, ``max_abs_diff``,
    ``median_abs_diff``, ``per_image`` (each image's max abs difference) and, for logits
    ``[B, classes]``, ``top1_agreement``."""
    if inputs.shape[0] == 0:
        raise ValueError("verify_onnx: no inputs to check")
    if not hasattr(session, "run"):
        session = ort_session(session)
    name = session.get_inputs()[0].name
    batch_size = batch_size or inputs.shape[0]
    per_image, agree = [], 0
    with Inference(model), torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start:start + batch_size].float().contiguous()
            ref = model(x).float()
            out = torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float()
            if out.shape != ref.shape:
                raise RuntimeError(f"onnxruntime returned {tuple(out.shape)} for batch {tuple(x.shape)}; "
                                   f"PyTorch {tuple(ref.shape)}")
            per_image.append((out - ref).abs().reshape(out.shape[0], -1).amax(dim=1))
            if ref.dim() == 2:
                agree += (out.argmax(-1) == ref.argmax(-1)).sum().item()
    diffs = torch.cat(per_image)
    result = {"images": int(inputs.shape[0]), "max_abs_diff": diffs.max().item(),
              "median_abs_diff": diffs.median().item(), "per_image": diffs}
    if ref.dim() == 2:
        result["top1_agreement"] = agree / inputs.shape[0]
    return result


class _OpenVINOSession:
    """A compiled OpenVINO model behind the part of onnxruntime's session interface that
    :func:`verify_onnx` uses (``get_inputs``, ``run``), so that one check serves both runtimes."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_name = compiled.input(0).get_any_name()

    def get_inputs(self):
        return [_Named(self.input_name)]

    def run(self, output_names, feed):
        (x,) = feed.values()
        result = self.request.infer({0: x})
        return [result[self.compiled.output(0)].copy()]


@dataclass
class _Named:
    name: str


def openvino_session(path: str, device: str = "CPU", threads: Optional[int] = None):
    """``path`` (ONNX) read and compiled by OpenVINO on ``device``, with fp32 inference precision
    (OpenVINO would run bf16 on CPUs that have it) and as many threads as torch uses; returns an
    object with onnxruntime's ``run`` / ``get_inputs``."""
    try:
        import openvino as ov
    except ImportError as err:
        raise ImportError("--runtime openvino needs the openvino package: pip install 'vitcompress[edge]'") from err
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads or torch.get_num_threads())}
    return _OpenVINOSession(core.compile_model(core.read_model(str(path)), device, config))


def compare_with_pytorch(session, model: nn.Module, shape: Tuple[int, ...], batches: Sequence[int],
                         inputs: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, Any]]:
    """:func:`verify_onnx` on random inputs of ``shape`` at each of ``batches`` (seeded: the same
    inputs every run) and, when given, on ``inputs`` (real images, in chunks of ``shape``'s batch);
    check name (``"random, batch 1"``, ``"real images, batch 8"``) -> result."""
    checks = {}
    generator = torch.Generator().manual_seed(0)
    for b in batches:
        x = torch.randn((b,) + shape[1:], generator=generator)
        checks[f"random, batch {b}"] = verify_onnx(session, model, x)
    if inputs is not None:
        checks[f"real images, batch {shape[0]}"] = verify_onnx(session, model, inputs, shape[0])
    return checks
