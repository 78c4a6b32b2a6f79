"""The main job (`vitcompress bench`) and the ImageNet evaluation script, on the reference model."""
import json
import os
import subprocess
import sys

import pytest
import torch

import vitcompress
from conftest import EXPERIMENTS
from vitcompress import cli
from vitcompress.cli.report import hardware, plot
from vitcompress.evaluation import reference_model as reference
from vitcompress.evaluation.classification import accuracy, batches, predict


def test_bench_json_rows_are_self_consistent(tmp_path, capsys):
    out, picture = tmp_path / "rows.json", tmp_path / "bench.png"
    code = cli.main(["bench", "--num-images", "128", "--methods", "tome", "pitome", "--flops", "0.8", "0.6", "0.8",
                     "--batch-size", "64", "--speed-model", "reference", "--speed-batch-size", "32", "--runs", "3",
                     "--quiet", "--json", str(out), "--plot", str(picture)])  # a repeat runs once
    assert code == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("none", "uncompressed"), ("tome", "flops=0.8"), ("tome", "flops=0.6"),
        ("pitome", "flops=0.8"), ("pitome", "flops=0.6")]
    base = rows[0]
    assert base["speedup"] == 1.0 and base["agreement"] == 1.0 and base["images"] == 128
    for r in rows:
        # speed: the timed model, its batch, the median of the interleaved runs and their spread
        assert r["speed_model"] == "reference" and r["speed_batch_size"] == 32 and r["speed_runs"] == 3
        assert len(r["images_per_s_runs"]) == 3
        assert r["images_per_s_min"] <= r["images_per_s_q1"] <= r["images_per_s"] <= r["images_per_s_q3"] \
            <= r["images_per_s_max"]
        assert r["images_per_s"] == pytest.approx(sorted(r["images_per_s_runs"])[1])
        assert r["speed_gflops"] == pytest.approx(r["gflops"])  # the evaluated model is the timed one here
        assert r["ideal_speedup"] == pytest.approx(1 / r["speed_flops_ratio"])
    for r in rows[1:]:
        assert r["speedup"] == pytest.approx(r["images_per_s"] / base["images_per_s"])
        assert r["flops_ratio"] == pytest.approx(r["gflops"] / base["gflops"])
        target = float(r["setting"].split("=")[1])
        assert abs(r["flops_ratio"] - target) < 0.03
        assert 0 <= r["agreement"] <= 1 and 0 <= r["top1"] <= 1
        assert r["tokens_per_layer"][0] == 65 and r["tokens_per_layer"][-1] < 65
        assert r["speed_tokens_per_layer"] == r["tokens_per_layer"]
    assert picture.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "median [min-max] of 3 interleaved runs" in table and "speedup" in table
    # how the speed was measured, and a warning whenever the machine was too busy to time it
    assert base["speed_conditions"]["batch_size"] == 32 and "speed measured on cpu" in table
    assert ("WARNING: timings not reliable" in table) == (base["timing_warning"] is not None)


@pytest.mark.slow
def test_bench_times_the_deit_s_architecture_by_default(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = cli.main(["bench", "--num-images", "64", "--settings", "tome:flops=0.55", "--speed-batch-size", "2",
                     "--runs", "2", "--quiet", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["speed_model"] for r in rows] == ["deit_small_patch16_224"] * 2
    assert rows[0]["speed_weights"] == "random weights" and rows[0]["speed_gflops"] == pytest.approx(4.6, abs=0.1)
    assert rows[1]["speed_tokens_per_layer"][0] == 197 and abs(rows[1]["speed_flops_ratio"] - 0.55) < 0.03
    assert rows[1]["tokens_per_layer"][0] == 65  # accuracy still on the reference model
    table = capsys.readouterr().out
    assert "speed: DeiT-S/224 architecture, random weights" in table


def test_settings_keep_list_values_whole():
    from vitcompress.cli.settings import parse_setting
    assert parse_setting("zero_tprune:flops=0.7,iters=[30,5,1],var_min=0.02") == (
        "zero_tprune", {"flops": 0.7, "iters": [30, 5, 1], "var_min": 0.02})
    assert parse_setting("zero_tprune:iters=(10, 5, 1)") == ("zero_tprune", {"iters": (10, 5, 1)})


def test_bench_reports_bad_settings_clearly(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--settings", "tome:keep=1.4", "--num-images", "8", "--quiet"])
    assert exit_.value.code == 2
    assert "outside (0, 1]" in capsys.readouterr().err


def _rows(speed=True):
    rows = [{"method": "none", "setting": "uncompressed", "flops_ratio": 1.0, "top1": 0.9},
            {"method": "tome", "setting": "flops=0.7", "flops_ratio": 0.7, "top1": 0.88},
            {"method": "tome", "setting": "flops=0.5", "flops_ratio": 0.5, "top1": 0.8},
            {"method": "pitome", "setting": "flops=0.7", "flops_ratio": 0.7, "top1": 0.89}]
    if speed:
        for r, median in zip(rows, (20.0, 27.0, 36.0, 26.0)):
            r.update(speed_model="deit_small_patch16_224", speed_weights="random weights", speed_batch_size=16,
                     device="cpu", speed_flops_ratio=r["flops_ratio"], images_per_s=median,
                     images_per_s_min=median - 1, images_per_s_max=median + 2)
    return rows


@pytest.mark.parametrize("ext", ["png", "pdf", "svg", "jpg"])
def test_bench_plot_draws_a_figure(tmp_path, ext):
    path = tmp_path / f"p.{ext}"
    plot(_rows(), str(path))
    assert path.stat().st_size > 1000
    if ext == "png":
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_bench_plot_title_names_models_hardware_and_date(tmp_path, monkeypatch):
    import datetime
    import matplotlib.figure

    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: titles.append(t))
    plot(_rows(), str(tmp_path / "p.png"))
    plot(_rows(speed=False), str(tmp_path / "q.png"))  # --speed-model none: the accuracy panel alone
    assert "DeiT-S/224 (architecture, random weights)" in titles[0] and "reference ViT" in titles[0]
    assert hardware("cpu") in titles[0] and datetime.date.today().isoformat() in titles[0]
    assert "threads" in hardware("cpu")


def test_pitome_keep_09_costs_at_most_1_5_points_on_the_reference_model():
    model, images, labels = reference.load()
    device = torch.device("cpu")
    base = accuracy(*predict(model, batches(images, labels, 500), device))["top1"]
    vitcompress.compress(model, "pitome", keep=0.9)
    pitome = accuracy(*predict(model, batches(images, labels, 500), device))["top1"]
    assert base >= 0.87
    assert base - pitome <= 0.015


def test_eval_imagenet_runs_on_an_imagefolder(tmp_path):
    from PIL import Image
    import numpy as np

    with np.load(os.path.join(reference.data_dir(), reference.IMAGES_FILE)) as npz:
        raw, labels = npz["images"][:60], npz["labels"][:60]
    for i, (img, y) in enumerate(zip(raw, labels)):
        folder = tmp_path / f"{int(y):02d}_{reference.CLASSES[y].replace('/', '-')}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    # every class present so ImageFolder's sorted class indices equal the labels
    assert len({int(y) for y in labels}) == 10
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "evaluation" / "eval_imagenet.py"), "--model", "reference",
         "--data-dir", str(tmp_path), "--batch-size", "16", "--workers", "0", "--runs", "2",
         "--method", "pitome", "--keep", "0.9"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert {"uncompressed", "pitome"} <= set(lines)
    top1 = float(lines["uncompressed"][1].rstrip("%"))
    assert top1 >= 80.0  # the trained model on real images, through PNG files and the folder loader
    assert float(lines["pitome"][3]) < float(lines["uncompressed"][3])  # fewer GFLOPs


def test_bench_methods_default_set_all_and_every_registered_vit_method():
    import argparse
    from vitcompress.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)

    def methods(argv):
        args = parser.parse_args(argv + ["--flops", "0.7"])
        bench.check_arguments(args, parser)
        return [method for _, method, _ in args.parsed_settings]

    registered = vitcompress.list_methods("vit")
    assert methods([]) == [m for m in bench.DEFAULT_METHODS if m in registered] and "tofu" in methods([])
    assert methods(["--methods", "all"]) == registered
    assert methods(["--methods"] + registered) == registered
    with pytest.raises(SystemExit):
        methods(["--methods", "tome", "no_such_method"])
