"""What ``export_onnx`` reports: the file written, its graph, and each check against PyTorch."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .int8 import FLOAT_REDUCTIONS

#: An int8 check is judged by its top-1 agreement only with at least this many images; smaller
#: ones (random inputs at two batch sizes) show that the file runs with the dynamic batch.
MIN_AGREEMENT_IMAGES = 100


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how the file compares with PyTorch in onnxruntime.

    ``checks`` maps a name (``"random, batch 1"``, ``"real images, batch 8"``) to the result of
    :func:`verify_onnx`. A check passes when at least ``min_match`` of its images are within
    ``atol`` (with fewer than 100 images: all of them). Token reduction makes discrete choices
    (rankings, best matches); where two scores are tied or nearly tied, the last bit of float
    rounding -- which differs between PyTorch and onnxruntime kernels -- can pick the other token
    and change that image's output, so on many real images a few may differ.

    An int8 file (``quantize="int8"``) is judged instead by top-1 agreement: a check of at least
    ``MIN_AGREEMENT_IMAGES`` images passes when at least ``min_match`` of them have the same top-1
    class as the fp32 PyTorch model; smaller checks only show that the file runs.
    """

    path: str
    opset: int
    input_shape: Tuple[int, ...]
    dynamic_batch: bool
    method: Optional[str]
    nodes: int
    op_counts: Dict[str, int]
    scatter_reductions: Dict[str, int]
    checks: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    atol: float = 1e-4
    min_match: float = 0.99
    seconds: float = 0.0
    runtime: str = "onnxruntime"
    quantize: Optional[str] = None
    quantized_nodes: List[str] = field(default_factory=list)
    linear_layers: int = 0
    float_reductions: int = FLOAT_REDUCTIONS
    calibration: str = ""

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.checks.values()), default=float("nan"))

    def within(self, name: str) -> int:
        """How many images of check ``name`` are within ``atol``."""
        return int((self.checks[name]["per_image"] <= self.atol).sum())

    def judged(self, name: str) -> bool:
        """Whether check ``name`` decides ``ok`` (for int8: enough images to measure agreement)."""
        check = self.checks[name]
        return not self.quantize or ("top1_agreement" in check and check["images"] >= MIN_AGREEMENT_IMAGES)

    def passed(self, name: str) -> bool:
        if not self.judged(name):
            return True
        if self.quantize:
            return self.checks[name]["top1_agreement"] >= self.min_match - 1e-9
        return self.within(name) >= self.min_match * self.checks[name]["images"] - 1e-9

    @property
    def ok(self) -> bool:
        return all(self.passed(name) for name in self.checks)

    def lines(self) -> List[str]:
        scatters = ", ".join(f"{k} x{v}" for k, v in self.scatter_reductions.items()) or "none"
        out = [f"wrote {self.path}: opset {self.opset}, {self.nodes} nodes, input {list(self.input_shape)}"
               f"{' (dynamic batch)' if self.dynamic_batch else ''}, method {self.method or 'none (uncompressed)'}",
               f"onnx.checker: ok; scatter nodes: {scatters} (no mean reduction)"]
        if self.quantize:
            out.append(f"{self.quantize}: {len(self.quantized_nodes)} of {self.linear_layers} linear layers quantized "
                       f"(QDQ, per-channel weights); in float: token selection, the projections scoring it (of a fused "
                       f"qkv, the keys, and the queries where attention scores) and the "
                       f"inputs of the first {self.float_reductions} reductions; calibration: {self.calibration}")
            for name, c in self.checks.items():
                agree = (f"top-1 agreement {100 * c['top1_agreement']:.2f}%" if "top1_agreement" in c
                         else "no top-1 (output is not [B, classes])")
                note = "" if self.judged(name) else f" (< {MIN_AGREEMENT_IMAGES} images: not judged)"
                out.append(f"{self.quantize} {self.runtime} vs fp32 PyTorch, {name}: {agree}{note}, "
                           f"max abs diff {c['max_abs_diff']:.3g}, median {c['median_abs_diff']:.3g}")
            if not any(self.judged(n) for n in self.checks):
                out.append(f"  (agreement is judged on >= {MIN_AGREEMENT_IMAGES} real images: give inputs= / "
                           "use the reference model)")
            judged = [self.checks[n]["top1_agreement"] for n in self.checks if self.judged(n)]
            verdict = f"top-1 agreement {100 * min(judged):.2f}% (>= {100 * self.min_match:g}% needed)" if judged \
                else "agreement not judged"
            out.append(f"{'OK' if self.ok else 'MISMATCH'}: {verdict}; {self.seconds:.0f} s")
            return out
        for name, c in self.checks.items():
            extra = f", top-1 agreement {100 * c['top1_agreement']:.2f}%" if "top1_agreement" in c else ""
            out.append(f"{self.runtime} vs PyTorch, {name}: max abs diff {c['max_abs_diff']:.3g}, "
                       f"{self.within(name)}/{c['images']} images within {self.atol:g}{extra}")
        if any(self.within(n) < c["images"] for n, c in self.checks.items()):
            out.append(f"  (images outside the tolerance: tied or nearly tied token scores that {self.runtime}'s "
                       "float rounding resolves the other way)")
        within = sum(self.within(n) for n in self.checks)
        images = sum(c["images"] for c in self.checks.values())
        out.append(f"{'OK' if self.ok else 'MISMATCH'}: {within} of {images} images within {self.atol:g} "
                   f"(>= {100 * self.min_match:g}% of each check needed); max abs diff {self.max_abs_diff:.3g}; "
                   f"{self.seconds:.0f} s")
        return out

    def shortfall(self) -> str:
        """What a check that fails falls short of (the warning of ``export_onnx``)."""
        if self.quantize:
            return f"the int8 file agrees with PyTorch's top-1 on fewer than {100 * self.min_match:g}% of the images"
        return (f"{self.runtime} differs from PyTorch beyond {self.atol:g} on more than "
                f"{100 * (1 - self.min_match):g}% of the images")

    def __str__(self) -> str:
        return "\n".join(self.lines())
