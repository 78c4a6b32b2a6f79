"""The support table: model family x method x (forward, restore exact, torch.compile, ONNX export),
every cell from an actual run on a small random model (no downloads). ``tests/test_support.py`` runs
exactly these checks (:func:`check`), so each cell of the README's table is a test.

    python experiments/studies/support_table.py                        # every cell (compile and ONNX: minutes)
    python experiments/studies/support_table.py --aspects forward restore
    python experiments/studies/support_table.py --families "transformers ViT" --methods tome --json cells.json

What a cell checks (``keep=0.8`` on ViT-like models, the method's own budget elsewhere):

* forward: the compressed model runs with the uncompressed output shape, its blocks see the planned
  token counts, and ``keep=1.0`` reproduces the uncompressed output (atol 1e-5; ViT-like models;
  for timm EVA and BEiT the pooled features, as timm starts their classifiers at 1e-3 of its scale).
  DETR: the detector's outputs keep their shapes and ``keep=1.0`` without dual attention reproduces
  them. LLaVA, Qwen-VL and InternVL: the language model gets fewer visual tokens than the uncompressed prompt has
  (Qwen-VL: two prompts, each with an image of its own size and a video).
* restore: ``vitcompress.restore`` gives bit-identical outputs, and no patched attribute is left.
* torch.compile: ``torch.compile(fullgraph=True)`` (inductor) of the compressed model runs the planned
  token counts and gives the eager outputs (atol 1e-5) for every image whose tokens it chose alike;
  compiled arithmetic may break an exact tie between two token scores the other way, which is
  allowed in at most one of the 4 images. Needs a C++ compiler.
* ONNX: ``vitcompress.export_onnx`` (torch.export, dynamic batch) passes its own onnxruntime check
  (max abs difference <= 1e-4 at batch 1 and 2). Needs the ``export`` extra. DETR and LLaVA methods
  are refused by ``export_onnx`` (checked: "refused").

Cell values: ``✓`` passed, ``✗`` failed, ``refused`` documented refusal (checked), ``·`` not checked,
``skip`` a dependency is missing here, ``—`` the method does not apply to the family.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

import vitcompress
from vitcompress.interfaces import PART_ATTR, runtime_of
from vitcompress.testing import (LLAVA_IMAGE_TOKEN, internvl_inputs, qwen_vl_inputs, random_images, ramp_scorer,
                                 tiny_detr, tiny_internvl_lm, tiny_llava_lm, tiny_qwen_vl)

ASPECTS = ("forward", "restore", "compile", "onnx")
VIT_METHODS = ("tome", "pitome", "zero_tprune", "evit", "mctf", "tofu", "ppt", "atc")
CLASS_TOKEN_METHODS = ("evit", "ppt")  # refused on a model without a class token (checked in tests/test_support.py)
CLASS_TOKEN_FREE = tuple(m for m in VIT_METHODS if m not in CLASS_TOKEN_METHODS)
# MCTF fuses in every block but the first by default: on these 2-block models, only after the last
# block's attention, which no block's input count shows; fusing in both blocks checks the same path
VIT_BUDGETS = {"mctf": dict(keep=0.8, layers=(0, 1))}
# the VLM methods that read LLaVA's feature layer and projector or drop tokens inside its language model
LLAVA_ONLY_METHODS = ("visionzip", "cdpruner", "fastv", "pyramiddrop", "dart")
ATOL = 1e-5
ONNX_ATOL = 1e-4
IMAGE = (3, 32, 32)


class Unavailable(Exception):
    """A dependency of a check is missing on this machine."""


class Refused(Exception):
    """The library refused, as documented (e.g. ONNX export of a DETR method)."""


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise Unavailable(f"{module} is not installed") from err


# --------------------------------------------------------------------------- families (tiny random models)

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10)
HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
          patch_size=4)


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(**TINY)


def _timm_deit_distilled():
    from timm.models.deit import VisionTransformerDistilled
    return VisionTransformerDistilled(**TINY)


def _timm_siglip():
    import timm
    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **TINY)


def _timm_eva02():
    import timm
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, **TINY)


def _timm_eva_registers():
    from timm.models.eva import Eva
    return Eva(**TINY, use_rot_pos_emb=True, num_reg_tokens=2, global_pool="map", use_abs_pos_emb=False)


def _timm_beit(**kwargs):
    """A BEiT whose relative position bias tables are random (timm starts them at zero), so the
    bias rows and columns each token sees matter."""
    from timm.models.beit import Beit
    model = Beit(**TINY, use_abs_pos_emb=False, init_values=0.1, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_()
    return model


def _pre_logits(model, x):
    """The pooled features (timm EVA and BEiT start their classifier at 1e-3 of its scale, so the
    logits of a random model would hide every difference below 1e-5)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _open_clip_vit():
    _need("open_clip")
    from open_clip.transformer import VisionTransformer
    return VisionTransformer(32, 4, 32, 2, 2, 2.0, output_dim=16)


def _hf(name: str, config: str, **kwargs):
    transformers = _need("transformers")
    if not hasattr(transformers, name):
        raise Unavailable(f"transformers {transformers.__version__} has no {name}")
    return getattr(transformers, name)(getattr(transformers, config)(**kwargs))


@dataclass
class Family:
    """A row of the table: a tiny random model of the family and how to read its output."""

    name: str
    models: str  # what the row stands for, for the table
    build: Callable[[], nn.Module]
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda model, x: model(x)
    methods: Tuple[str, ...] = VIT_METHODS
    kind: str = "vit"  # "vit" | "detr" | "llava"
    budgets: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    prompt: Callable[[nn.Module], Dict[str, Any]] = None  # a VLM's call (None: the LLaVA-1.5 one)

    def budget(self, method: str) -> Dict[str, Any]:
        return self.budgets.get(method, VIT_BUDGETS.get(method, dict(keep=0.8)))

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()


def _pooled(model, x):
    return model(pixel_values=x).pooler_output


def _logits(model, x):
    return model(pixel_values=x).logits


FAMILIES: List[Family] = [
    Family("timm ViT", "`VisionTransformer` (class token)", _timm_vit),
    Family("timm DeiT distilled", "`VisionTransformerDistilled` (class + distillation token)", _timm_deit_distilled),
    Family("timm SigLIP", "`vit_*_siglip_*` (no class token, MAP pooling)", _timm_siglip,
           methods=CLASS_TOKEN_FREE),
    Family("timm EVA-02", "`Eva` (`eva02_*`: rotary position embeddings, SwiGLU, avg pooling)", _timm_eva02,
           _pre_logits),
    Family("timm EVA + registers", "`Eva` (rotary, class token + registers, MAP pooling)", _timm_eva_registers,
           _pre_logits),
    Family("timm BEiT", "`Beit` (relative position bias per block, layer scale, avg pooling)",
           lambda: _timm_beit(use_rel_pos_bias=True), _pre_logits),
    Family("timm BEiT shared bias", "`Beit` (one shared relative position bias, class token pooling)",
           lambda: _timm_beit(use_shared_rel_pos_bias=True, global_pool="token"), _pre_logits),
    Family("open_clip ViT", "`VisionTransformer` image tower", _open_clip_vit),
    Family("transformers CLIP", "`CLIPVisionModel`", lambda: _hf("CLIPVisionModel", "CLIPVisionConfig", **HF), _pooled),
    Family("transformers ViT", "`ViTForImageClassification`",
           lambda: _hf("ViTForImageClassification", "ViTConfig", **HF, num_labels=5), _logits),
    Family("transformers DeiT", "`DeiTForImageClassificationWithTeacher`",
           lambda: _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **HF, num_labels=5), _logits),
    Family("transformers DINOv2", "`Dinov2ForImageClassification` (LayerScale, size-weighted patch mean)",
           lambda: _hf("Dinov2ForImageClassification", "Dinov2Config", **dict(HF, intermediate_size=None),
                       mlp_ratio=2, layerscale_value=0.5, num_labels=5), _logits),
    Family("transformers DINOv2 + registers", "`Dinov2WithRegistersModel`",
           lambda: _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", **dict(HF, intermediate_size=None),
                       mlp_ratio=2, num_register_tokens=2), _pooled),
    Family("transformers SigLIP", "`SiglipVisionModel` (size-aware attention-pooling head)",
           lambda: _hf("SiglipVisionModel", "SiglipVisionConfig", **HF), _pooled, methods=CLASS_TOKEN_FREE),
]


def _relevance(patches, question):
    """cdpruner's offline relevance: a fixed cosine per patch (the question does not matter here)."""
    return torch.linspace(-1, 1, patches.shape[1]).expand(patches.shape[:2])


def _detr():
    _need("transformers")
    return tiny_detr()


def _llava():
    _need("transformers")
    return tiny_llava_lm("llava", layers=4)  # room for fastv / dart after layer 2


def _internvl():
    _need("transformers")
    return tiny_internvl_lm(layers=4)  # room for fastv / dart after layer 2


OTHER_FAMILIES: List[Family] = [
    Family("transformers DETR", "`DetrForObjectDetection` (encoder tokens)", _detr, _logits, methods=("focus_detr",),
           kind="detr", budgets={"focus_detr": dict(keep=0.5)}),
    Family("transformers LLaVA-1.5", "`LlavaForConditionalGeneration` (visual tokens; ViT methods in its CLIP tower)",
           _llava, methods=VIT_METHODS + ("tokencorr", "quota") + LLAVA_ONLY_METHODS, kind="llava",
           budgets={"tokencorr": {}, "quota": dict(keep=0.5, scorer=ramp_scorer),
                    "visionzip": dict(dominant=12, contextual=4), "cdpruner": dict(tokens=16, scorer=_relevance),
                    "fastv": {}, "pyramiddrop": {}, "dart": {}}),
    Family("transformers InternVL", "`InternVLForConditionalGeneration` (visual tokens per tile after the pixel "
           "shuffle; tokencorr and quota keep the thumbnail)", _internvl,
           methods=("tokencorr", "quota") + LLAVA_ONLY_METHODS, kind="llava",
           budgets={"tokencorr": {}, "quota": dict(keep=0.5, scorer=ramp_scorer),
                    "visionzip": dict(dominant=5, contextual=3), "cdpruner": dict(tokens=4, scorer=_relevance),
                    "fastv": {}, "pyramiddrop": {}, "dart": {}},
           prompt=lambda model: internvl_inputs()),
]


def _qwen_vl(kind: str) -> Family:
    version = {"qwen2": "Qwen2-VL", "qwen2_5": "Qwen2.5-VL", "qwen3": "Qwen3-VL"}[kind]
    name = {"qwen2": "Qwen2VL", "qwen2_5": "Qwen2_5_VL", "qwen3": "Qwen3VL"}[kind]
    return Family(f"transformers {version}", f"`{name}ForConditionalGeneration` (visual tokens after the merger)",
                  lambda: tiny_qwen_vl(kind, layers=8),  # room for fastv / dart after layer 2 and DeepStack's 2
                  methods=("tokencorr", "quota", "fastv", "pyramiddrop", "dart", "visionzip", "cdpruner"),
                  kind="llava",
                  budgets={"tokencorr": {}, "quota": dict(keep=0.5, scorer=ramp_scorer), "fastv": {},
                           "pyramiddrop": {}, "dart": {}, "visionzip": dict(dominant=6, contextual=2, layer=-1),
                           "cdpruner": dict(tokens=8, scorer=_relevance)},
                  prompt=lambda model: qwen_vl_inputs(model, kind))


OTHER_FAMILIES += [_qwen_vl(kind) for kind in ("qwen2", "qwen2_5", "qwen3")]
ALL_FAMILIES = FAMILIES + OTHER_FAMILIES
OTHER_METHODS = ("focus_detr", "tokencorr", "quota") + LLAVA_ONLY_METHODS
ALL_METHODS = VIT_METHODS + OTHER_METHODS
# the README / docs print two tables: the ViT methods on every family that takes them (LLaVA: in its
# vision tower), and the detection and VLM methods on their families
TABLES = ((VIT_METHODS, [f for f in ALL_FAMILIES if set(f.methods) & set(VIT_METHODS)]),
          (OTHER_METHODS, OTHER_FAMILIES))


def family(name: str) -> Family:
    for f in ALL_FAMILIES:
        if f.name == name:
            return f
    raise KeyError(f"no family {name!r}; families: {', '.join(f.name for f in ALL_FAMILIES)}")


def cases() -> List[Tuple[str, str]]:
    """Every (family, method) cell of the table."""
    return [(f.name, m) for f in ALL_FAMILIES for m in f.methods]


# --------------------------------------------------------------------------- the checks


class _Tensor(nn.Module):
    """A model seen as image tensor -> one tensor (what torch.compile checks and ONNX exports)."""

    def __init__(self, model: nn.Module, output):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x):
        return self.output(self.model, x)


def _assert_close(got, want, atol, what):
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    diff = (got.float() - want.float()).abs().max().item()
    if not diff <= atol:
        raise AssertionError(f"{what}: max abs difference {diff:.3g} > {atol:g}")


def _assert_schedule(model):
    st = vitcompress.stats(model)
    if st["tokens_per_layer"] != st["planned_tokens_per_layer"]:
        raise AssertionError(f"tokens per layer {st['tokens_per_layer']} != planned {st['planned_tokens_per_layer']}")
    if st["planned_tokens_per_layer"][-1] >= st["planned_tokens_per_layer"][0]:
        raise AssertionError("the compressed model reduces no token")


def _llava_inputs():
    """Two prompts with an image each: noise, and one constant colour (redundant crops for tokencorr)."""
    rows = [[1, 5] + [LLAVA_IMAGE_TOKEN] * 64 + [7, 8], [1, 6] + [LLAVA_IMAGE_TOKEN] * 64 + [9, 9]]
    images = torch.stack([random_images(1)[0], torch.full(IMAGE, 0.4)])
    return dict(input_ids=torch.tensor(rows), attention_mask=torch.ones(2, len(rows[0]), dtype=torch.long),
                pixel_values=images)


def _run(fam: Family, model, x=None):
    with torch.no_grad():
        if fam.kind == "llava":
            question = {"question": "what is shown?"} if runtime_of(model) is not None else {}
            return model(**(fam.prompt(model) if fam.prompt else _llava_inputs()), **question).logits
        if fam.kind == "detr":
            return model(pixel_values=torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))).logits
        return fam.output(model, random_images() if x is None else x)


def check_forward(fam: Family, method: str) -> str:
    model = fam.model()
    ref = _run(fam, model)
    if fam.kind == "vit":
        vitcompress.compress(model, method, keep=1.0)
        _assert_close(_run(fam, model), ref, ATOL, "keep=1.0")
    if fam.kind == "detr":
        vitcompress.compress(model, method, keep=1.0, cascade=[1.0] * 6, dual_k=0)
        _assert_close(_run(fam, model), ref, ATOL, "keep=1.0, no cascade, no dual attention")
    vitcompress.compress(model, method, **fam.budget(method))
    out = _run(fam, model)
    if fam.kind == "llava":
        st = vitcompress.stats(model)
        if not st["visual_tokens_after"] < st["visual_tokens_before"]:
            raise AssertionError(f"visual tokens {st['visual_tokens_before']} -> {st['visual_tokens_after']}")
        if not torch.isfinite(out).all():
            raise AssertionError("non-finite logits")
        return "✓"
    if out.shape != ref.shape or not torch.isfinite(out).all():
        raise AssertionError(f"output {tuple(out.shape)} (uncompressed {tuple(ref.shape)})")
    if fam.kind == "vit":
        _assert_schedule(model)
    else:  # DETR: every encoder layer runs on the planned share of its tokens, fewer than all of them
        st = vitcompress.stats(model)
        if st["tokens_per_layer"] != st["planned_tokens_per_layer"] or \
                max(st["tokens_per_layer"]) >= max(st["encoder_tokens"]):
            raise AssertionError(f"encoder tokens {st['encoder_tokens']}, per layer {st['tokens_per_layer']} "
                                 f"(planned {st['planned_tokens_per_layer']})")
    return "✓"


def check_restore(fam: Family, method: str) -> str:
    model = fam.model()
    ref = _run(fam, model)
    vitcompress.compress(model, method, **fam.budget(method))
    compressed = _run(fam, model)
    vitcompress.restore(model)
    back = _run(fam, model)
    if not torch.equal(back, ref):
        raise AssertionError("restored outputs differ from the original")
    if runtime_of(model) is not None or any(PART_ATTR in m.__dict__ for m in model.modules()):
        raise AssertionError("a patched attribute is left after restore")
    if compressed.shape == ref.shape and torch.equal(compressed, ref):
        raise AssertionError("the compressed model computed the uncompressed outputs")
    return "✓"


def has_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))


def check_compile(fam: Family, method: str) -> str:
    if fam.kind != "vit":
        return "·"
    if not has_compiler():
        raise Unavailable("torch.compile's inductor backend needs a C++ compiler on a CPU")
    torch._dynamo.reset()
    model = vitcompress.compress(fam.model(), method, trace_source=True, **fam.budget(method))
    wrapped = _Tensor(model, fam.output).eval()
    x = random_images(4, seed=2)
    with torch.no_grad():
        want = wrapped(x)
        eager_source = vitcompress.stats(model)["source"]
        got = torch.compile(wrapped, fullgraph=True)(x)
        compiled_source = vitcompress.stats(model)["source"]
    _assert_schedule(model)
    # Compiled float arithmetic may break an exact tie between two token scores the other way and
    # pick another token (as onnxruntime may): images whose tokens match must match to atol, and
    # such ties must stay rare.
    same = [b for b in range(x.shape[0]) if torch.equal(eager_source[b], compiled_source[b])]
    if len(same) < x.shape[0] - 1:
        raise AssertionError(f"compiled and eager chose other tokens in {x.shape[0] - len(same)} of {x.shape[0]} images")
    _assert_close(got[same], want[same], ATOL, "compiled vs eager")
    return "✓"


def check_onnx(fam: Family, method: str) -> str:
    for module in ("onnx", "onnxruntime", "onnxscript"):
        _need(module)
    from vitcompress.export import check_exportable, export_onnx

    if fam.kind == "llava" and method in VIT_METHODS:
        return "·"  # a LLaVA is not an image -> tensor model export_onnx takes
    model = fam.model()
    if fam.kind != "vit":
        vitcompress.compress(model, method, **fam.budget(method))
        try:
            check_exportable(model)
        except ValueError as err:
            raise Refused(str(err)) from None
        raise AssertionError("export of a non-ViT method was not refused")
    vitcompress.compress(model, method, **fam.budget(method))
    wrapped = _Tensor(model, fam.output).eval()
    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(wrapped, os.path.join(tmp, "model.onnx"), (2,) + IMAGE, atol=ONNX_ATOL, verbose=False)
    if not report.ok or not report.max_abs_diff <= ONNX_ATOL:
        raise AssertionError(f"onnxruntime vs PyTorch: {report.max_abs_diff:.3g}")
    with torch.no_grad():
        _run(fam, model)  # the token state again comes from real tensors, not the export's
    _assert_schedule(model)
    return "✓"


CHECKS = {"forward": check_forward, "restore": check_restore, "compile": check_compile, "onnx": check_onnx}


def check(family_name: str, method: str, aspect: str) -> str:
    """Run one cell's check: "✓", "·" (not checked for this family) or "refused" (raises
    :class:`Refused`); raises :class:`Unavailable` when a dependency is missing and AssertionError
    (or the library's error) when the check fails."""
    fam = family(family_name)
    if method not in fam.methods:
        raise KeyError(f"{method} is not checked on {family_name}")
    return CHECKS[aspect](fam, method)


def cell(family_name: str, method: str, aspect: str) -> Tuple[str, str]:
    """:func:`check` as a table cell: (value, detail)."""
    try:
        return check(family_name, method, aspect), ""
    except Refused as err:
        return "refused", str(err).splitlines()[0]
    except Unavailable as err:
        return "skip", str(err)
    except Exception as err:  # noqa: BLE001 -- a failed cell is reported, not raised
        return "✗", f"{type(err).__name__}: {err}".splitlines()[0] + "\n" + traceback.format_exc(limit=-3)


# --------------------------------------------------------------------------- the table


def table(results: Dict[Tuple[str, str, str], Tuple[str, str]], aspects, methods, families=None) -> str:
    """A markdown table: a row per family (of ``families``, default all) with a result, a column per
    method, each cell the aspects in order."""
    header = "| family | models | " + " | ".join(methods) + " |"
    lines = [header, "|" + "---|" * (len(methods) + 2)]
    for fam in ALL_FAMILIES if families is None else families:
        if not any((fam.name, m, a) in results for m in methods for a in aspects):
            continue
        cells = []
        for m in methods:
            if m not in fam.methods:
                cells.append("—")
                continue
            cells.append(" ".join(results.get((fam.name, m, a), ("·", ""))[0] for a in aspects))
        lines.append(f"| {fam.name} | {fam.models} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aspects", nargs="+", default=list(ASPECTS), choices=ASPECTS)
    parser.add_argument("--families", nargs="+", help="family names (default: all)")
    parser.add_argument("--methods", nargs="+", help="methods (default: all that apply)")
    parser.add_argument("--json", help="write every cell (value, detail, seconds) here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.families or [f.name for f in ALL_FAMILIES]
    for name in names:
        family(name)  # an unknown name fails before the long run
    methods = [m for m in ALL_METHODS if args.methods is None or m in args.methods]
    results, rows, failed = {}, [], 0
    start = time.time()
    for name in names:
        for method in family(name).methods:
            if method not in methods:
                continue
            for aspect in args.aspects:
                t0 = time.time()
                value, detail = cell(name, method, aspect)
                seconds = time.time() - t0
                results[name, method, aspect] = (value, detail)
                rows.append(dict(family=name, method=method, aspect=aspect, value=value, detail=detail,
                                 seconds=round(seconds, 2)))
                failed += value == "✗"
                print(f"{name:34s} {method:12s} {aspect:8s} {value:8s} {seconds:6.1f}s  {detail.splitlines()[0] if detail else ''}",
                      file=sys.stderr, flush=True)
    print(f"\n{len(rows)} checks in {time.time() - start:.0f} s; torch {torch.__version__}", file=sys.stderr)
    print(f"Cells: {' / '.join(args.aspects)} (✓ passed, ✗ failed, refused = refused as documented, "
          "· not checked, skip = dependency missing, — method does not apply)\n")
    for table_methods, families in TABLES:
        shown = [m for m in table_methods if m in methods and any(r["method"] == m for r in rows)]
        if shown:
            print(table(results, args.aspects, shown, families) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1, ensure_ascii=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
