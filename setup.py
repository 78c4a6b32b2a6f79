import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("vitcompress/__init__.py", encoding="utf-8").read()).group(1)

EXTRAS = {
    "dev": ["pytest>=7", "hypothesis>=6"],
    # ONNX export + onnxruntime check (vitcompress export); tested with onnx 1.23, onnxruntime 1.32, onnxscript 0.7
    "export": ["onnx>=1.17,<2", "onnxruntime>=1.20,<2", "onnxscript>=0.5,<1"],
    # edge runtimes (vitcompress export --quantize int8 / --runtime openvino, export_executorch): int8 is
    # onnxruntime's own quantization; tested with openvino 2026.4 and executorch 1.5.1 (which does not
    # pin torch and runs with torch 2.14)
    "edge": ["onnx>=1.17,<2", "onnxruntime>=1.20,<2", "onnxscript>=0.5,<1", "openvino>=2025.1,<2027",
             "executorch>=1.5,<1.6"],
    # CLIP towers (open_clip; tested with open-clip-torch 3.3), HF CLIP / DETR / LLaVA (tested with
    # transformers 5.24), COCO evaluation (pycocotools 2.0)
    "clip": ["open-clip-torch>=2.24,<4"],
    "hf": ["transformers>=4.40,<6"],
    "coco": ["pycocotools>=2.0.7"],
    # OpenVINO runtime for export checks (vitcompress export --runtime openvino)
    "openvino": ["openvino>=2025.1,<2027"],
    # the documentation site (mkdocs build --strict); tested with mkdocs 1.6.1, mkdocs-material 9.8.2
    # (its pymdown-extensions 13.1 includes CHANGELOG.md), mkdocstrings 1.0.8 + mkdocstrings-python 2.0.11
    "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=0.27,<2"],
    # the lmms-eval model `--model vitcompress` (tested with lmms-eval 0.7.3, which keeps torch 2.14 / transformers 5.25
    # but brings ~85 packages: datasets, accelerate, wandb, openai, pandas, scikit-learn, ...; its evaluator imports
    # filelock._api, which filelock 4 no longer has)
    "lmms": ["lmms-eval>=0.7.3,<0.8", "transformers>=5,<6", "filelock<4"],
}
# "all": what the default tests use; ExecuTorch is left to "edge" (it brings torchao, coremltools, ...), the
# site's tools to "docs", lmms-eval to "lmms"
EXTRAS["all"] = sorted({req for name, reqs in EXTRAS.items() if name not in ("dev", "edge", "docs", "lmms")
                        for req in reqs})

setup(
    name="vitcompress",
    version=VERSION,
    license="MIT",
    description="Training-free token reduction (Zero-TPrune, PiToMe, ToMe, ...) for timm, open_clip, DETR and LLaVA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # the one importable package of the repository (tests/, experiments/ and docs/ are not installed)
    packages=find_packages(include=["vitcompress", "vitcompress.*"]),
    package_data={"vitcompress": ["py.typed"], "vitcompress.evaluation": ["data/*"]},
    install_requires=["torch>=2.1,<2.15", "torchvision>=0.16,<0.30", "timm>=1.0,<2", "fvcore>=0.1.5",
                      "numpy", "tqdm", "matplotlib>=3.5"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["vitcompress=vitcompress.cli:main"],
                  # lmms-eval's model registry: `python -m lmms_eval --model vitcompress`
                  "lmms_eval.models": ["vitcompress=vitcompress.evaluation.lmms:manifest"]},
)
