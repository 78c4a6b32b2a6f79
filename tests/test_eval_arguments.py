"""The evaluation scripts check their arguments as ``vitcompress bench`` does: a bad method, budget,
option, model or device ends the script before any model is built (before the process group
starts, too) with one line on stderr that names the fix, and exit status 2."""
import subprocess
import sys

import pytest
import torch

from conftest import EXPERIMENTS, load_script
from vitcompress import list_methods
from vitcompress.evaluation import distributed

IMAGENET = ["--model", "reference", "--data-dir", "unread"]
CLIP = ["--model-config", "unread.json", "--data-dir", "unread"]
COCO = ["--config", "unread.json", "--data-dir", "unread", "--annotations", "unread.json"]

#: (script, its required arguments, the bad ones, what the one-line error must say)
BAD = [
    ("eval_imagenet", IMAGENET, ["--method", "tome", "--flops", "1.5"], "flops=1.5 is outside (0, 1]"),
    ("eval_imagenet", IMAGENET, ["--method", "pitome", "--keep", "0"], "e.g. keep=0.9"),
    ("eval_imagenet", IMAGENET, ["--method", "tome", "--r", "eight"], "give an int, a list like [8,8,4]"),
    ("eval_imagenet", IMAGENET, ["--method", "tome", "--r", "-2"], "use r >= 0"),
    ("eval_imagenet", IMAGENET, ["--method", "tomee"], "invalid choice: 'tomee' (choose from"),
    ("eval_imagenet", IMAGENET, ["--keep", "0.5"], "need a compression --method"),
    ("eval_imagenet", ["--model", "deit_smal_patch16_224", "--data-dir", "unread"], [],
     "did you mean deit_small_patch16_224"),
    ("eval_imagenet", IMAGENET, ["--method", "tome", "--keep", "0.5", "--r", "4"], "not allowed with argument"),
    ("eval_clip", CLIP, ["--method", "pitome", "--flops", "2"], "e.g. flops=0.9"),
    ("eval_clip", CLIP, ["--method", "tomee"], "invalid choice: 'tomee' (choose from"),
    ("eval_clip", CLIP, ["--method", "pitome", "--opt", "margn=0.5"], "its options are"),
    ("eval_clip", CLIP, ["--method", "pitome", "--opt", "margin=high"], "must be a number"),
    ("eval_clip", CLIP, ["--method", "tome", "--opt", "r=4"], "give budgets as --keep / --r / --flops"),
    ("eval_clip", CLIP, ["--opt", "margin=0.5"], "need a compression --method"),
    ("eval_coco", COCO, ["--keep", "1.5"], "e.g. keep=0.9"),
    ("eval_coco", COCO, ["--method", "tome"], "invalid choice: 'tome' (choose from"),
    ("eval_coco", COCO, ["--scorer", "learned"], "needs exactly one of scorer_path="),
    ("eval_coco", COCO, ["--dual-k", "-1"], "must be an int >= 0"),
]
if not torch.cuda.is_available():
    BAD.append(("eval_imagenet", IMAGENET, ["--device", "cuda"], "use --device cpu"))


def one_error_line(err: str, script: str, says: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{script}.py: error: ") and says in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("script,required,bad,says", BAD, ids=[f"{s}-{' '.join(b)}" for s, _, b, _ in BAD])
def test_a_bad_argument_is_one_line_and_exit_2_before_anything_starts(monkeypatch, capsys, script, required, bad,
                                                                      says):
    """In the process: nothing past the checks runs (no session, so no model and no process group)."""
    def started(device):
        raise AssertionError(f"{script} started a session despite {bad}")

    monkeypatch.setattr(distributed, "session", started)
    module = load_script(f"evaluation/{script}.py")
    with pytest.raises(SystemExit) as exit_:
        module.main(required + bad)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    one_error_line(err, script, says)


#: what each script prints itself: a bad budget and an unknown method (the choices: every ViT method)
VIT_CHOICES = "(choose from " + ", ".join(repr(m) for m in list_methods("vit")) + ")"
SCRIPT_RUNS = [
    ("eval_imagenet", IMAGENET, ["--method", "tome", "--flops", "1.5"], "e.g. flops=0.9"),
    ("eval_imagenet", IMAGENET, ["--method", "tomee"], VIT_CHOICES),
    ("eval_clip", CLIP, ["--method", "tome", "--keep", "0"], "e.g. keep=0.9"),
    ("eval_clip", CLIP, ["--method", "tomee"], VIT_CHOICES),
    ("eval_coco", COCO, ["--keep", "0"], "e.g. keep=0.9"),
    ("eval_coco", COCO, ["--method", "tome"], "(choose from 'focus_detr')"),
]


@pytest.mark.parametrize("script,required,bad,says", SCRIPT_RUNS, ids=[f"{s}-{' '.join(b)}" for s, _, b, _ in SCRIPT_RUNS])
def test_the_script_itself_prints_one_line_and_exits_2(script, required, bad, says):
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "evaluation" / f"{script}.py"), *required, *bad],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    one_error_line(proc.stderr, script, says)


def test_good_arguments_pass_the_checks_as_compress_takes_them():
    imagenet = load_script("evaluation/eval_imagenet.py").parse_args(
        IMAGENET + ["--method", "tome", "--r", "[4,4,2,0,0,0]", "--device", "cpu"])
    assert (imagenet.budget, imagenet.device) == ({"r": [4, 4, 2, 0, 0, 0]}, "cpu")
    assert load_script("evaluation/eval_imagenet.py").parse_args(IMAGENET).budget == {}
    clip = load_script("evaluation/eval_clip.py").parse_args(
        CLIP + ["--method", "pitome", "--keep", "0.8", "--opt", "margin=0.5", "--opt", "alpha=1.0"])
    assert (clip.budget, clip.options) == ({"keep": 0.8}, {"margin": 0.5, "alpha": 1.0})
    coco = load_script("evaluation/eval_coco.py").parse_args(COCO + ["--keep", "0.3", "--dual-k", "0"])
    assert (coco.keep, coco.options) == (0.3, {"dual_k": 0})
