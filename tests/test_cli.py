"""The command line checks every argument before it builds a model (issue 16), and the one model
loader behind it (issue 14)."""
import os
import subprocess
import sys
import time

import pytest
import torch

import vitcompress
from vitcompress import cli
from vitcompress.evaluation import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (arguments, a piece of the message that names the fix); "{tmp}" is a writable temporary folder
BAD_ARGUMENTS = [
    (["bench", "--plot", "/nonexistent/dir/p.png"], "create it first"),
    (["bench", "--plot", "{tmp}/p.gif"], ".png / .pdf / .svg / .jpg"),
    (["bench", "--plot", "{tmp}/noextension"], ".png / .pdf / .svg / .jpg"),
    (["bench", "--plot", "{tmp}"], "give the file to write"),
    (["bench", "--plot", "{tmp}/afile.txt/p.png"], "is a file, not a folder; choose another path"),
    (["bench", "--json", "/nonexistent/dir/rows.json"], "create it first"),
    (["bench", "--json", "{tmp}/rows.txt"], "ending in .json"),
    (["bench", "--num-images", "0"], "must be >= 1, got 0; give e.g. --num-images 512"),
    (["bench", "--num-images", "-5"], "must be >= 1, got -5"),
    (["bench", "--num-images", "many"], "is not an integer"),
    (["bench", "--batch-size", "0"], "give e.g. --batch-size"),
    (["bench", "--speed-batch-size", "0"], "give e.g. --speed-batch-size 16"),
    (["bench", "--runs", "0"], "give e.g. --runs 5"),
    (["bench", "--workers", "-1"], "must be >= 0"),
    (["bench", "--flops", "1.5"], "outside (0, 1]"),
    (["bench", "--flops", "0.7", "0"], "outside (0, 1]"),
    (["bench", "--settings", "tome:keep=1.4"], "outside (0, 1]"),
    (["bench", "--settings", "tome:r=-2"], "use r >= 0"),
    (["bench", "--settings", "tome:keep=0.9,r=4"], "give at most one of keep=, r=, flops="),
    (["bench", "--settings", "nosuch:keep=0.5"], "known methods:"),
    (["bench", "--settings", "pitome:keep=0.9,nosuch=1"], "its options are"),
    (["bench", "--settings", "focus_detr:keep=0.5"], "methods for ViT-like image encoders"),
    (["bench", "--methods", "tome", "nosuch"], "--methods nosuch: unknown; choose from "),
    (["bench", "--device", "tpu9"], "give cpu or cuda"),
    (["bench", "--model", "deit_smal_patch16_224", "--data", "{tmp}"], "did you mean deit_small_patch16_224"),
    (["bench", "--model", "deit_small_patch16_224"], "needs --data IMAGEFOLDER"),
    (["bench", "--model", "deit_small_patch16_224", "--data", "/nonexistent/val"], "give an ImageFolder"),
    (["bench", "--pretrained"], "drop --pretrained"),
    (["bench", "--speed-model", "no_such_vit"], "timm.list_models"),
    (["export", "--out", "/nonexistent/dir/m.onnx"], "create it first"),
    (["export", "--out", "{tmp}/m.txt"], "ending in .onnx"),
    (["export", "--keep", "0"], "outside (0, 1]"),
    (["export", "--flops", "2"], "outside (0, 1]"),
    (["export", "--r", "abc"], "give an int, a list like [8,8,4]"),
    (["export", "--r", "-3"], "use r >= 0"),
    (["export", "--method", "nosuch"], "known methods:"),
    (["export", "--method", "none", "--keep", "0.5"], "need a compression --method"),
    (["export", "--batch-size", "0"], "give e.g. --batch-size 8"),
    (["export", "--num-images", "0"], "give e.g. --num-images 512"),
    (["export", "--opset", "13"], "give e.g. --opset 18"),
    (["export", "--img-size", "64"], "drop --img-size"),
    (["export", "--atol", "-1"], "must be >= 0"),
    (["export", "--static-batch", "--num-images", "20", "--batch-size", "8"], "give a multiple of --batch-size"),
    (["export", "--pretrained"], "drop --pretrained"),
    (["export", "--model", "no_such_vit"], "timm.list_models"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((["bench", "--device", "cuda"], "use --device cpu"))


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if anything builds or loads a model."""
    import timm

    from vitcompress.evaluation import reference_model

    built = []

    def refuse(*args, **kwargs):
        built.append(args)
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(reference_model, "load", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)
    return built


@pytest.mark.parametrize("argv, fix", BAD_ARGUMENTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_argument_exits_2_with_one_line_naming_the_fix_before_any_model(argv, fix, tmp_path, capsys,
                                                                             no_model_built):
    (tmp_path / "afile.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith(f"vitcompress {argv[0]}: error: ") and "Traceback" not in err
    assert fix in err
    assert not no_model_built
    assert elapsed < 5.0, f"{elapsed:.1f} s to refuse {argv}"
    assert sorted(os.listdir(tmp_path)) == ["afile.txt"], "nothing written"


def test_a_bad_argument_fails_fast_from_the_shell():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vitcompress", "bench", "--plot", "/nonexistent/dir/p.png"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "create it first" in proc.stderr
    assert elapsed < 5.0


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"vitcompress {vitcompress.__version__}")


def test_python_m_vitcompress_help():
    proc = subprocess.run([sys.executable, "-m", "vitcompress", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert all(command in proc.stdout for command in ("bench", "export", "show", "--version"))


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["export", "--help"], ["show", "--help"]])
def test_help_has_no_markup(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: vitcompress" in text
    for markup in ("``", ":func:", ":class:", ":mod:", ":meth:"):
        assert markup not in text


def test_bench_help_says_what_the_main_job_measures(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "deit_small_patch16_224" in text and "random weights" in text


def test_good_arguments_pass_the_checks(tmp_path, no_model_built):
    args = cli.parse_args(["bench", "--plot", str(tmp_path / "p.svg"), "--json", str(tmp_path / "r.json"),
                           "--settings", "tome:r=4", "pitome:keep=0.9,margin=0.5", "--device", "cpu"])
    assert [text for text, _, _ in args.parsed_settings] == ["tome:r=4", "pitome:keep=0.9,margin=0.5"]
    args = cli.parse_args(["bench", "--methods", "tome", "--flops", "0.7", "0.7"])
    assert [text for text, _, _ in args.parsed_settings] == ["tome:flops=0.7"]
    assert args.device in ("cpu", "cuda")
    args = cli.parse_args(["export", "--method", "pitome", "--r", "(8, -0.5)", "--out", str(tmp_path / "m.onnx")])
    assert cli.arguments.budget_arguments(args) == {"r": (8, -0.5)} and args.opset == 18
    assert os.listdir(tmp_path) == []
    # fp32 and int8 files of one model get different default names (one never overwrites the other)
    fp32 = cli.parse_args(["export", "--method", "tome", "--model", "reference"]).out
    int8 = cli.parse_args(["export", "--method", "tome", "--model", "reference", "--quantize", "int8"]).out
    assert (fp32, int8) == ("reference-tome.onnx", "reference-tome-int8.onnx")


# --------------------------------------------------------------------------- the model loader


def test_loader_reference_model():
    loaded = models.load_model("reference", num_images=16)
    assert loaded.input_size == models.reference_input_size() == (1, 32, 32)
    assert loaded.images.shape == (16, 1, 32, 32) and loaded.labels.shape == (16,)
    assert loaded.weights == "embedded trained weights" and not loaded.model.training


def test_loader_timm_model_random_and_checkpoint(tmp_path):
    loaded = models.load_model("test_vit", num_classes=7)
    assert loaded.weights == "random weights" and loaded.input_size == (3, 160, 160)
    assert loaded.model.num_classes == 7 and not loaded.model.training
    path = tmp_path / "w.pt"
    torch.save({"state_dict": loaded.model.state_dict()}, path)
    again = models.load_model("test_vit", num_classes=7, checkpoint=str(path), pretrained=True)  # no hub
    assert again.weights == f"checkpoint {path}"
    for a, b in zip(loaded.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="check the model name and --num-classes"):
        models.load_model("test_vit", checkpoint=str(path))  # 1000 classes
    with pytest.raises(FileNotFoundError, match="no such file"):
        models.load_model("test_vit", checkpoint=str(tmp_path / "missing.pt"))


def test_loader_names_the_fix_for_an_unknown_name_and_an_unreachable_hub(monkeypatch):
    with pytest.raises(ValueError, match="did you mean deit_small_patch16_224"):
        models.check_model_name("deit_small_patch16")
    with pytest.raises(ValueError, match="drop --pretrained"):
        models.load_model("reference", pretrained=True)
    import timm

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("[Errno -2] Name or service not known")
        raise AssertionError("not reached")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(models.WeightsUnavailable, match="drop --pretrained.*HF_HOME"):
        models.load_model("deit_small_patch16_224", pretrained=True)


def test_cli_reports_an_unreachable_hub_in_one_line(monkeypatch, tmp_path, capsys):
    def offline(*args, **kwargs):
        raise models.WeightsUnavailable("cannot fetch the pretrained weights of 'test_vit' (...). Fix: drop --pretrained")

    monkeypatch.setattr(models, "load_model", offline)
    assert cli.main(["bench", "--model", "test_vit", "--pretrained", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --pretrained" in err and "Traceback" not in err


def test_one_cli_module():
    """The commands live in vitcompress.cli; the export package keeps only the library."""
    from vitcompress import export

    assert not hasattr(export, "run_cli") and not hasattr(export, "add_cli_arguments")
    assert set(cli.build_parser().commands) == {"bench", "export", "show", "tune"}
