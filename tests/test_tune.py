"""``vitcompress.tune`` (issue 29): the Pareto front, the chosen setting re-measured independently,
unlabelled data, the fallback to the uncompressed model, one-line errors, the command line, and
the busy-machine warning every speed figure carries."""
import json
import os

import pytest
import torch

import vitcompress
from vitcompress import cli
from vitcompress.evaluation import reference_model
from vitcompress.interfaces import runtime_of
from vitcompress.profile.conditions import busy_warning
from vitcompress.tuning import pareto_front


@pytest.fixture(scope="module")
def reference():
    model, images, labels = reference_model.load(num_images=150)
    return model, images, labels


@pytest.fixture
def speed_by_flops(monkeypatch):
    """Timing replaced by a deterministic figure (images/s inversely proportional to the tokens the
    blocks process), so the choice does not depend on the load of the machine running the tests."""
    def fake(models, inputs, **kwargs):
        rows = {}
        for name, m in models.items():
            tokens = vitcompress.stats(m)["planned_tokens_per_layer"] if runtime_of(m) else [65] * len(m.blocks)
            speed = 1e6 / sum(tokens)
            rows[name] = dict(throughput=speed, throughput_q1=speed, throughput_q3=speed, throughput_runs=[speed],
                              latency_ms=1e3 / speed, conditions=dict(device="cpu (test)", dtype="float32",
                                                                      batch_size=len(inputs), threads=1,
                                                                      attention="SDPA", cores=1, load=None),
                              timing_warning=None)
        return rows
    monkeypatch.setattr("vitcompress.tuning.compare_speed", fake)


def test_pareto_front_removes_dominated_points():
    points = [(1.0, 90.0), (1.2, 89.0), (1.1, 88.0), (1.5, 85.0), (1.4, 84.0), (1.5, 80.0), (0.9, 90.0)]
    # (1.1, 88) < (1.2, 89); (1.4, 84) and (1.5, 80) < (1.5, 85); (0.9, 90) < (1.0, 90)
    assert pareto_front(points) == [0, 1, 3]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # equal points dominate neither
    assert pareto_front([]) == []


def _top1(model, images, labels):
    with torch.inference_mode():
        return 100.0 * (model(images).argmax(-1) == labels).float().mean().item()


def test_tune_chooses_a_setting_within_max_drop_on_the_front(reference, speed_by_flops):
    model, images, labels = reference
    result = vitcompress.tune(model, (images, labels), max_drop=1.0, methods=["tome"], budgets=[0.9, 0.8, 0.6],
                              batch_size=150, runs=2, refine=1, refine_steps=1, progress=False)
    assert result.chosen is not None, result.message
    assert result.chosen in result.pareto and result.baseline["method"] == "none"
    assert {r["method"] for r in result.rows} == {"none", "tome", "random"}
    # re-measured independently: a fresh model compressed by the chosen call, top-1 on the same images
    fresh = reference_model.load(num_images=0)[0]
    base = _top1(fresh, images, labels)
    result.apply(fresh)
    assert vitcompress.stats(fresh)["method"] == result.chosen["method"]
    drop = base - _top1(fresh, images, labels)
    assert drop <= 1.0 and drop == pytest.approx(result.chosen["drop"], abs=1e-6)
    # fastest among the settings within max_drop
    within = [r for r in result.rows[1:] if r["drop"] <= 1.0]
    assert len(within) >= 2 and result.chosen["speedup"] == max(r["speedup"] for r in within)
    assert result.compress_call.startswith(f"vitcompress.compress(model, {result.chosen['method']!r}, flops=")
    saved = json.loads(result.to_json())
    assert saved["rows"][saved["chosen"]]["on_pareto_front"] and saved["compress_call"] == result.compress_call


def test_unlabelled_data_scores_agreement_with_the_uncompressed_model(reference, speed_by_flops):
    model, images, _ = reference
    result = vitcompress.tune(model, images[:60], max_drop=2.0, methods=["tome"], budgets=[0.6], batch_size=60,
                              runs=1, refine=0, random_baseline=False, progress=False)
    assert result.metric == "agreement" and result.baseline["quality"] == 100.0
    row = next(r for r in result.rows if r["method"] == "tome")
    compressed = vitcompress.compress(reference_model.load(num_images=0)[0], "tome", flops=0.6)
    with torch.inference_mode():
        agree = (compressed(images[:60]).argmax(-1) == model(images[:60]).argmax(-1)).float().mean().item()
    assert row["quality"] == pytest.approx(100 * agree)


def test_nothing_within_max_drop_keeps_the_model_uncompressed(reference, speed_by_flops):
    model, images, labels = reference
    result = vitcompress.tune(model, (images[:60], labels[:60]), max_drop=0.0, methods=["tome"], budgets=[0.3],
                              batch_size=60, runs=1, refine=0, random_baseline=False, progress=False)
    assert result.chosen is None and "no setting loses at most max_drop=0" in result.message
    assert result.compress_call.startswith("model  # uncompressed")
    before = model(images[:8])
    assert torch.equal(result.apply(model)(images[:8]), before)


@pytest.mark.parametrize("case, fix", [
    ("empty folder", "holds no images"),
    ("not a vit", "supported families"),
    ("top1 without labels", "needs labelled data"),
    ("time budget", "is too short"),
    ("bad metric", "give one of top1, agreement, cosine"),
])
def test_bad_input_gets_a_one_line_error_naming_the_fix(case, fix, reference, tmp_path):
    model, images, labels = reference
    kwargs = dict(methods=["tome"], budgets=[0.7], progress=False)
    with pytest.raises((ValueError, TypeError)) as err:
        if case == "empty folder":
            vitcompress.tune(model, str(tmp_path), **kwargs)
        elif case == "not a vit":
            vitcompress.tune(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10)), images, **kwargs)
        elif case == "top1 without labels":
            vitcompress.tune(model, images[:20], metric="top1", **kwargs)
        elif case == "time budget":
            vitcompress.tune(model, (images, labels), time_budget=1e-3, **kwargs)
        else:
            vitcompress.tune(model, images[:20], metric="top5", **kwargs)
    assert fix in str(err.value) and "\n" not in str(err.value)


def test_the_random_method_keeps_a_fixed_random_subset_per_block():
    from vitcompress.testing import random_images, tiny_vit

    model = vitcompress.compress(tiny_vit(), "random", r=[8, 8, 8, 8])
    out = model(random_images(3))
    assert vitcompress.stats(model)["tokens_per_layer"] == [65, 57, 49, 41]
    assert torch.equal(model(random_images(3)), out)  # the same draw every call
    other = vitcompress.compress(tiny_vit(), "random", r=[8, 8, 8, 8], seed=1)
    assert not torch.equal(other(random_images(3)), out)


def test_busy_warning_from_the_spread_of_runs_or_the_load():
    calm = dict(device="cpu", load=1.0, cores=4, threads=1)
    assert busy_warning([[100, 101, 99, 100, 100]], calm) is None
    assert "vary by" in busy_warning([[100, 60, 140, 80, 120]], calm)
    assert "load average 6.0 on 4 cores" in busy_warning([[100, 100]], dict(calm, load=6.0))
    assert busy_warning([[100, 100]], dict(calm, device="cuda:0", load=6.0)) is None  # the GPU does the work


def test_compare_speed_says_how_it_measured():
    from vitcompress.testing import random_images, tiny_vit

    row = vitcompress.compare_speed({"m": tiny_vit()}, random_images(2), warmup=0, runs=2, latency=False,
                                    memory=False)["m"]
    c = row["conditions"]
    assert c["dtype"] == "float32" and c["batch_size"] == 2 and c["threads"] == torch.get_num_threads()
    assert c["device"].startswith("cpu") and "SDPA" in c["attention"] and "timing_warning" in row


def test_the_tune_command_writes_the_table_json_and_plot(tmp_path, capsys, speed_by_flops):
    out_json, out_plot = tmp_path / "t.json", tmp_path / "t.png"
    rc = cli.main(["tune", "--num-images", "50", "--methods", "tome", "--budgets", "0.7", "--runs", "1",
                   "--max-drop", "5", "--batch-size", "50", "--json", str(out_json), "--plot", str(out_plot),
                   "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "apply: " in text and "measured on" in text
    saved = json.loads(out_json.read_text())
    assert saved["model"] == "reference" and {r["method"] for r in saved["rows"]} == {"none", "tome", "random"}
    assert os.path.getsize(out_plot) > 1000


@pytest.mark.parametrize("argv, fix", [
    (["tune", "--methods", "nosuch"], "choose from"),
    (["tune", "--budgets", "1.0"], "give fractions below 1"),
    (["tune", "--model", "deit_small_patch16_224"], "needs --data-dir"),
    (["tune", "--model", "deit_small_patch16_224", "--data-dir", "/nonexistent/x"], "no such folder"),
    (["tune", "--time-budget", "0"], "seconds > 0"),
])
def test_tune_arguments_are_checked_first(argv, fix, capsys):
    with pytest.raises(SystemExit) as code:
        cli.parse_args(argv)
    err = capsys.readouterr().err
    assert code.value.code == 2 and fix in err and err.count("\n") == 1
