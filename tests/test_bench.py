"""The main job (`vitcompress bench`) and the ImageNet evaluation script, on the reference model."""
import json
import os
import subprocess
import sys

import pytest
import torch

import vitcompress
from vitcompress import cli
from vitcompress import reference_model as reference
from vitcompress.evaluate import accuracy, batches, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_json_rows_are_self_consistent(tmp_path):
    out = tmp_path / "rows.json"
    code = cli.main(["bench", "--num-images", "256", "--methods", "tome", "pitome", "--flops", "0.8", "0.6", "0.8",
                     "--batch-size", "64", "--runs", "2", "--quiet", "--json", str(out)])  # a repeat runs once
    assert code == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("none", "uncompressed"), ("tome", "flops=0.8"), ("tome", "flops=0.6"),
        ("pitome", "flops=0.8"), ("pitome", "flops=0.6")]
    base = rows[0]
    assert base["speedup"] == 1.0 and base["agreement"] == 1.0
    for r in rows[1:]:
        assert r["speedup"] == pytest.approx(r["images_per_s"] / base["images_per_s"])
        assert r["flops_ratio"] == pytest.approx(r["gflops"] / base["gflops"])
        target = float(r["setting"].split("=")[1])
        assert abs(r["flops_ratio"] - target) < 0.03
        assert 0 <= r["agreement"] <= 1 and 0 <= r["top1"] <= 1
        assert r["tokens_per_layer"][0] == 65 and r["tokens_per_layer"][-1] < 65


def test_settings_keep_list_values_whole():
    from vitcompress.settings import parse_setting
    assert parse_setting("zero_tprune:flops=0.7,iters=[30,5,1],var_min=0.02") == (
        "zero_tprune", {"flops": 0.7, "iters": [30, 5, 1], "var_min": 0.02})
    assert parse_setting("zero_tprune:iters=(10, 5, 1)") == ("zero_tprune", {"iters": (10, 5, 1)})


def test_bench_reports_bad_settings_clearly(capsys):
    assert cli.main(["bench", "--settings", "tome:keep=1.4", "--num-images", "8", "--quiet"]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err


def test_bench_plot_draws_a_figure(tmp_path):
    rows = [{"method": "none", "gflops": 1.0, "images_per_s": 100.0, "top1": 0.9},
            {"method": "tome", "gflops": 0.7, "images_per_s": 130.0, "top1": 0.88},
            {"method": "tome", "gflops": 0.5, "images_per_s": 170.0, "top1": 0.8}]
    cli.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


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
        [sys.executable, os.path.join(ROOT, "experiments", "eval_imagenet.py"), "--model", "reference",
         "--data-dir", str(tmp_path), "--batch-size", "16", "--workers", "0", "--runs", "2",
         "--method", "pitome", "--keep", "0.9"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert {"uncompressed", "pitome"} <= set(lines)
    top1 = float(lines["uncompressed"][1].rstrip("%"))
    assert top1 >= 80.0  # the trained model on real images, through PNG files and the folder loader
    assert float(lines["pitome"][3]) < float(lines["uncompressed"][3])  # fewer GFLOPs
