"""experiments/benchmarks/bench_vlm.py --quick: FLOPs equal to a count by formula, refusals printed, rows consistent."""
import contextlib
import io

import pytest

import vitcompress
from conftest import load_script

bench = load_script("benchmarks/bench_vlm.py")
METHODS = ["fastv", "quota", "tokencorr", "visionzip"]  # visionzip: more tokens than the quick Qwen image has


def run(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = bench.main(["--quick", *argv])
    return result, out.getvalue()


@pytest.fixture(scope="module")
def quick():
    return run("--methods", *METHODS)


def rows_of(result, family, scenario):
    return {r["setting"]: r for r in result["rows"] if r["family"] == family and r["scenario"] == scenario}


def llava_flops(lm_tokens, fastv_scored_tokens=0):
    """Multiply-adds of the quick LLaVA's prefill, by formula: CLIP tower (577 tokens, 4 layers, 32 wide, patch
    convolution), projector (576 patches, 32 -> 256 -> 256), the language model's layers on ``lm_tokens``
    tokens each (256 wide, 2 heads and 1 KV head of 128, MLP 64), the head on the last token (vocabulary
    256); FastV's scoring: q, k of every token at its layer and the last token's attention row."""
    vision, patches, mlp = 32, 576, 64
    n = patches + 1
    tower = patches * vision * 3 * 4 * 4 + 4 * (4 * n * vision ** 2 + 2 * n * vision * mlp + 2 * n * n * vision)
    hidden, heads, kv_heads, head_dim = 256, 2, 1, 128
    projector = patches * (vision * hidden + hidden * hidden)
    layers = sum(n * hidden * (2 * heads + 2 * kv_heads) * head_dim + 2 * heads * n * n * head_dim
                 + 3 * n * hidden * 64 for n in lm_tokens)
    t = fastv_scored_tokens
    scoring = t * hidden * (heads + kv_heads) * head_dim + heads * t * head_dim
    return tower + projector + layers + hidden * 256 + scoring


def test_decoder_layer_formula_is_the_one_stated():
    assert bench.decoder_layer_flops(10, 256, 2, 1, 128, 64) == \
        10 * 256 * 768 + 2 * 2 * 100 * 128 + 3 * 10 * 256 * 64


def test_flops_and_tokens_per_layer_equal_an_independent_count(quick):
    result, _ = quick
    rows = rows_of(result, "llava", "image")
    text, visual = 56, 576
    full = [text + visual] * 4
    assert rows["uncompressed"]["lm_tokens"] == full
    assert rows["uncompressed"]["flops"] == llava_flops(full)
    # FastV K=2, R=0.5: layers 0 and 1 see every token, the rest half of the visual ones
    fastv = rows["fastv keep=0.5 layer=2"]
    dropped = full[:2] + [text + visual // 2] * 2
    assert fastv["lm_tokens"] == dropped
    assert fastv["flops"] == llava_flops(dropped, fastv_scored_tokens=text + visual)
    assert fastv["flops_ratio"] == pytest.approx(llava_flops(dropped, text + visual) / llava_flops(full), rel=1e-12)
    # every layer's count follows the formula stated in the script for the language model
    layer = bench.decoder_layer_flops
    assert llava_flops([100]) - llava_flops([]) == layer(100, 256, 2, 1, 128, 64)


def test_rows_are_self_consistent(quick):
    result, _ = quick
    assert {(r["family"], r["scenario"]) for r in result["rows"]} == {
        ("llava", "image"), ("qwen2_5_vl", "image"), ("qwen2_5_vl", "video")}
    for r in result["rows"]:
        base = rows_of(result, r["family"], r["scenario"])["uncompressed"]
        assert len(r["ms_runs"]) == 2 and r["ms_q1"] <= r["ms"] <= r["ms_q3"]
        assert r["flops_ratio"] == pytest.approx(r["flops"] / base["flops"])
        assert r["ideal"] == pytest.approx(base["flops"] / r["flops"])
        assert r["speedup"] == pytest.approx(base["ms"] / r["ms"])
        assert r["of_ideal"] == pytest.approx(r["speedup"] / r["ideal"])
        assert r["memory_ratio"] == pytest.approx(r["peak_bytes"] / base["peak_bytes"])
        assert r["raises_memory"] == (r["peak_bytes"] > base["peak_bytes"]) and r["peak_bytes"] > 0
        if r["setting"] != "uncompressed":  # every timed setting reduces something
            assert r["flops"] < base["flops"] and r["lm_tokens"][-1] < base["lm_tokens"][-1]
    # Qwen2.5-VL: tokencorr reduces the image, QuoTA the video's frame groups, FastV both inside the language model
    assert set(rows_of(result, "qwen2_5_vl", "image")) == {"uncompressed", "tokencorr", "fastv keep=0.5 layer=2"}
    assert set(rows_of(result, "qwen2_5_vl", "video")) == {"uncompressed", "quota keep=0.5", "fastv keep=0.5 layer=2"}


def test_every_method_is_measured_or_says_why_in_one_line(quick):
    result, out = quick
    for family in ("llava", "qwen2_5_vl"):
        support = vitcompress.supported(bench.FAMILIES[family](bench.parse_args(["--quick"]))[0])
        measured = {r["setting"].split()[0] for r in result["rows"] if r["family"] == family}
        for method in METHODS:
            lines = [line for line in result["skipped"][family] if line.startswith(method)]
            assert method in measured or lines
            if support[method] is not True:
                reason = " ".join(support[method].split())
                assert lines == [f"{method}: not supported: {reason}"]
                assert f"  {method}: not supported: {reason}\n" in out
    # visionzip runs on Qwen2.5-VL up to its budget check: the quick image has 16 tokens, the paper's split 54 + 10
    assert "visionzip: prefill failed on the image: ValueError: dominant=54 + contextual=10 tokens need more than " \
           "the 16 visual tokens of an image" in result["skipped"]["qwen2_5_vl"]
    assert "quota keep=0.5: reduces no token of the image" in result["skipped"]["qwen2_5_vl"]


def test_header_says_how_it_was_measured(quick):
    result, out = quick
    header = out.splitlines()[0]
    for part in ("cpu", "float32", "batch 1", f"{result['conditions']['threads']} threads", "torch ",
                 "load average (1, 5, 15 min) at start"):
        assert part in header
    assert "load average at end" in out
    assert ("WARNING: timings not reliable" in out) == (result["timing_warning"] is not None)
    assert "CLIP tower 4 layers x 32" in out and "language model 4 layers x 64" in out


def test_a_method_that_fails_is_reported_not_raised(monkeypatch):
    compress = vitcompress.compress

    def failing(model, method, **options):
        if method == "tokencorr":
            raise RuntimeError("broken\nmethod")
        return compress(model, method, **options)

    monkeypatch.setattr(vitcompress, "compress", failing)
    result, out = run("--families", "qwen2_5_vl", "--methods", "tokencorr", "quota")
    assert result["skipped"]["qwen2_5_vl"][0] == "tokencorr: compress failed: RuntimeError: broken method"
    assert {r["setting"] for r in result["rows"]} == {"uncompressed", "quota keep=0.5"}
