"""The evaluation scripts across processes: under torchrun (CPU, gloo) they give exactly the
single-process results, a rank that fails stops every rank, and the shard / merge pieces they
share are checked without processes.

This file is also the entry point of the COCO oracle run under torchrun (see ``__main__``)."""
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import EXPERIMENTS, load_script
from vitcompress.evaluation import distributed
from vitcompress.evaluation import reference_model as reference
from vitcompress.evaluation.classification import (batches, gather_detections, hit_counts, merge_detections, predict, rates,
                                  throughput_over_ranks)
from vitcompress.testing import OPEN_CLIP_TEXT, OPEN_CLIP_VISION

try:  # test_detr's six images, COCO annotations and tiny DETR (that module skips without transformers/pycocotools)
    from test_detr import coco_set  # noqa: F401
except pytest.skip.Exception:
    coco_set = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_IMAGENET, EVAL_CLIP = (str(EXPERIMENTS / "evaluation" / name) for name in ("eval_imagenet.py", "eval_clip.py"))
RANKS = 2
TIMEOUT = 300  # seconds for one launch: a hang fails the test instead of stalling the run


def torchrun(script, args, succeeds=True):
    """``script args`` on RANKS CPU processes under torchrun; the completed process, checked to
    have succeeded unless ``succeeds`` is false."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(RANKS), script, *args],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    if succeeds:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def one_thread():
    """The single-process run on one thread, as each rank under torchrun (OMP_NUM_THREADS=1): the
    same arithmetic, and no oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows_of(path):
    return {r["model"]: r for r in json.loads(path.read_text())}


# ----------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_shards_cover_every_item_exactly_once(world_size):
    for length in (0, 1, 2, 3, 4, 5, 7, 101, 1000):
        shards = [list(distributed.shard_indices(length, r, world_size)) for r in range(world_size)]
        assert sorted(i for s in shards for i in s) == list(range(length))
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_shard_rejects_bad_ranks_and_too_few_items():
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        distributed.shard_indices(10, 2, 2)
    with pytest.raises(ValueError, match="start at most 2 processes"):
        distributed.shard(list(range(2)), distributed.Context(rank=0, world_size=3))
    data = list(range(7))
    part = distributed.shard(data, distributed.Context(rank=1, world_size=3))
    assert [part[i] for i in range(len(part))] == [1, 4]
    assert distributed.shard(data, distributed.Context()) is data


def test_merge_rows_restores_dataset_order_and_catches_gaps():
    rows = torch.randn(11, 3)
    parts = [(torch.tensor(distributed.shard_indices(11, r, 3)), rows[r::3]) for r in range(3)]
    assert torch.equal(distributed.merge_rows(parts[::-1], 11), rows)  # any rank order
    with pytest.raises(ValueError, match="1 of 11 items missing and 0 seen more than once"):
        distributed.merge_rows(parts[:1] + [(parts[1][0][:-1], parts[1][1][:-1])] + parts[2:], 11)
    with pytest.raises(ValueError, match="0 of 11 items missing and 4 seen more than once"):
        distributed.merge_rows(parts + parts[:1], 11)


def test_counts_summed_over_shards_give_the_accuracy_of_the_whole():
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 10, (103, 5), generator=g)
    labels = torch.randint(0, 10, (103,), generator=g)
    parts = [hit_counts(top[r::4], labels[r::4]) for r in range(4)]
    total = distributed.add_counts(parts)
    assert total == hit_counts(top, labels) and total["images"] == 103
    independent = {"top1": (top[:, 0] == labels).double().mean().item(),
                   "top5": (top == labels[:, None]).any(1).double().mean().item()}
    assert rates(total) == pytest.approx(independent, abs=1e-15)
    with pytest.raises(ValueError, match="ranks report different counts"):
        distributed.add_counts([{"top1": 1}, {"top5": 1}])


def test_merge_detections_is_the_single_process_order():
    image_ids = [7, 3, 9, 1, 4]
    results = [{"image_id": i, "score": s} for i in image_ids for s in (0.9, 0.2, 0.5)]  # per image, query order
    per_rank = [[r for r in results if image_ids.index(r["image_id"]) % 2 == rank] for rank in (1, 0)]
    assert merge_detections(per_rank, image_ids) == results
    with pytest.raises(ValueError, match=r"image ids \[99\]"):
        merge_detections([[{"image_id": 99}]], image_ids)


def test_a_single_process_needs_no_process_group():
    with distributed.session("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
        assert not torch.distributed.is_initialized()
        assert ctx.gather({"a": 1}) == [{"a": 1}]
        assert gather_detections([{"image_id": 3}], [3], ctx) == [{"image_id": 3}]
        assert throughput_over_ranks(12.5, ctx) == {"images_per_s": 12.5, "images_per_s_per_rank": [12.5]}
        with pytest.raises(KeyError):  # a step's own error, unchanged
            with ctx.step("testing"):
                raise KeyError("x")


# ----------------------------------------------------------------------------- eval_imagenet.py


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """101 embedded reference images as PNGs in an ImageFolder (class folders sorted as the labels)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("reference_folder")
    with np.load(os.path.join(reference.data_dir(), reference.IMAGES_FILE)) as npz:
        raw, labels = npz["images"][:101], npz["labels"][:101]
    assert len(set(labels.tolist())) == 10  # every class present: folder index = label
    for i, (img, y) in enumerate(zip(raw, labels)):
        folder = root / f"{int(y):02d}_{reference.CLASSES[y].replace('/', '-')}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def test_eval_imagenet_on_two_ranks_equals_one_process(reference_folder, tmp_path, capsys, one_thread):
    """101 images over 2 ranks (51 + 50): the same top-1 / top-5 and image count as one process,
    for the uncompressed and the compressed model, and as the model on the images in memory."""
    args = ["--model", "reference", "--data-dir", str(reference_folder), "--batch-size", "16", "--workers", "0",
            "--runs", "1", "--device", "cpu", "--method", "pitome", "--keep", "0.9"]
    assert load_script("evaluation/eval_imagenet.py").main(args + ["--json", str(tmp_path / "one.json")]) == 0
    one = rows_of(tmp_path / "one.json")
    assert "ranks" not in capsys.readouterr().out
    proc = torchrun(EVAL_IMAGENET, args + ["--json", str(tmp_path / "two.json")])
    two = rows_of(tmp_path / "two.json")
    assert proc.stdout.count("top-1") == 1  # only rank 0 prints
    assert "101 images on 2 ranks (51 + 50)" in proc.stdout

    model, images, labels = reference.load(num_images=101)
    independent = hit_counts(*predict(model, batches(images, labels, 101), torch.device("cpu")))
    assert rates(independent) == {k: one["uncompressed"][k] for k in ("top1", "top5")}
    for name in ("uncompressed", "pitome"):
        assert (two[name]["top1"], two[name]["top5"]) == (one[name]["top1"], one[name]["top5"])
        assert two[name]["images"] == one[name]["images"] == 101
        assert two[name]["images_per_rank"] == [51, 50] and one[name]["images_per_rank"] == [101]
        per_rank = two[name]["images_per_s_per_rank"]
        assert len(per_rank) == 2 and min(per_rank) > 0 and two[name]["images_per_s"] == pytest.approx(sum(per_rank))
    assert one["pitome"]["top1"] != 0 and two["pitome"]["gflops"] < two["uncompressed"]["gflops"]


def test_a_bad_argument_stops_every_rank_before_the_process_group_with_one_line_each():
    """Every rank checks its arguments before the process group starts and exits 2 with the same
    line (torchrun then reports the failed ranks); no rank waits for a collective, no traceback."""
    proc = torchrun(EVAL_IMAGENET, ["--model", "reference", "--data-dir", "unread", "--device", "cpu",
                                    "--method", "tome", "--flops", "1.5"], succeeds=False)
    script_lines = [line for line in proc.stderr.splitlines() if line.startswith("eval_imagenet.py")]
    assert script_lines == ["eval_imagenet.py: error: flops=1.5 is outside (0, 1]: it is the fraction of the "
                            "uncompressed FLOPs, e.g. flops=0.9"] * RANKS, proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr
    assert 'eval_imagenet.py", line' not in proc.stderr  # no traceback of the script itself


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank(reference_folder, tmp_path):
    """Two processes started by hand (as on two nodes, no torchrun agent to kill the other), rank 1
    with a data folder that does not exist: both exit with the error, neither hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    missing = tmp_path / "no_such_folder"
    procs = []
    for rank, data in enumerate((reference_folder, missing)):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen(
            [sys.executable, EVAL_IMAGENET, "--model", "reference",
             "--data-dir", str(data), "--workers", "0", "--runs", "1", "--device", "cpu"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:  # a hang ends in TimeoutExpired
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [1, 1], outputs
    rank0_err, rank1_err = outputs[0][1], outputs[1][1]
    assert "rank 1 of 2 failed while reading the images" in rank0_err and str(missing) in rank0_err
    assert str(missing) in rank1_err
    assert "top-1" not in outputs[0][0]


# ----------------------------------------------------------------------------- eval_clip.py


@pytest.mark.slow
def test_eval_clip_on_two_ranks_equals_one_process(tmp_path, one_thread):
    """Zero-shot accuracy (hits summed) and retrieval recalls (embeddings gathered) on 2 ranks are
    those of one process, on odd numbers of images and captions."""
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}

    def image(colour, path):
        noise = torch.randint(0, 60, (32, 32, 3), generator=g)
        Image.fromarray((torch.tensor(colour) + noise).clamp(0, 255).byte().numpy()).save(path)

    lines, words = [], ["one", "two", "three", "four", "five", "six", "seven"]
    (tmp_path / "images").mkdir()
    for c, (name, colour) in enumerate(colours.items()):
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(3 - (c == 0)):  # 8 images
            image(colour, tmp_path / "classes" / name / f"{i}.png")
    for i in range(7):
        name, colour = list(colours.items())[i % 3]
        image(colour, tmp_path / "images" / f"{i}.png")
        # distinct captions: identical ones tie exactly, and a rounding difference may break the tie
        lines += [f"{i}.png#0\ta {name} square {words[i]}"] + ([f"{i}.png#1\t{words[i]} {name}"] if i % 2 else [])
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = dict(OPEN_CLIP_TEXT, vocab_size=49408)  # open_clip's tokenizer
    (tmp_path / "tiny_clip.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": OPEN_CLIP_VISION,
                                                         "text_cfg": text}))
    torch.manual_seed(0)
    open_clip.add_model_config(tmp_path / "tiny_clip.json")
    torch.save(open_clip.create_model("tiny_clip").state_dict(), tmp_path / "tiny_clip.pt")

    args = ["--model-config", str(tmp_path / "tiny_clip.json"), "--checkpoint", str(tmp_path / "tiny_clip.pt"),
            "--data-dir", str(tmp_path / "classes"), "--captions", str(tmp_path / "captions.tsv"),
            "--images", str(tmp_path / "images"), "--batch-size", "2", "--workers", "0", "--runs", "1",
            "--device", "cpu", "--method", "tome", "--r", "8"]
    assert load_script("evaluation/eval_clip.py").main(args + ["--json", str(tmp_path / "one.json")]) == 0
    # "--": torchrun would read the script's --r as an abbreviation of one of its own options
    torchrun(EVAL_CLIP, ["--"] + args + ["--json", str(tmp_path / "two.json")])
    one, two = rows_of(tmp_path / "one.json"), rows_of(tmp_path / "two.json")
    metrics = [f"zeroshot_top{k}" for k in (1, 5)] + [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    for name in ("uncompressed", "tome"):
        assert {k: two[name][k] for k in metrics} == {k: one[name][k] for k in metrics}
        assert len(two[name]["images_per_s_per_rank"]) == 2
    # not all trivially perfect: recall@1 over 7 images of 3 colours with a random model
    assert any(one[name][k] < 1 for name in one for k in ("i2t_r1", "t2i_r1", "zeroshot_top1"))


# ----------------------------------------------------------------------------- eval_coco.py


def oracle_hook(data_dir, annotations, size, max_size):
    """A forward hook that makes a DETR output the ground truth of each image it is given (found by
    its pixels, whatever the batch or rank), with boxes shifted on even image ids and confidence
    rising with the id, so that AP is neither 0 nor 1 and depends on every image."""
    from test_detr import oracle_outputs
    from vitcompress.evaluation.coco import CocoDetection

    data = CocoDetection(data_dir, annotations, size, max_size)
    truth = {hashlib.sha1(data[i][0].numpy().tobytes()).hexdigest(): data[i][1] for i in range(len(data))}

    def hook(module, args, kwargs, out):
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        mask = kwargs.get("pixel_mask")
        targets = []
        for b in range(pixel_values.shape[0]):
            h, w = int(mask[b].any(dim=1).sum()), int(mask[b].any(dim=0).sum())
            targets.append(truth[hashlib.sha1(pixel_values[b, :, :h, :w].contiguous().numpy().tobytes()).hexdigest()])
        logits, boxes = oracle_outputs(targets, out.logits.shape[1], out.logits.shape[2] - 1)
        for b, t in enumerate(targets):
            logits[b] = torch.where(logits[b] > 0, 2.0 + t["image_id"], logits[b])
            if t["image_id"] % 2 == 0:
                boxes[b, :, 0] += 0.1 * boxes[b, :, 2]
        out.logits, out.pred_boxes = logits, boxes
        return out
    return hook


def coco_oracle_main(argv):
    """eval_coco.main with the oracle hook on the loaded DETR (also on its compressed copy)."""
    eval_coco = load_script("evaluation/eval_coco.py")
    args = eval_coco.parse_args(argv)
    load_detr = eval_coco.load_detr

    def hooked(*a, **kw):
        model = load_detr(*a, **kw)
        model.register_forward_hook(oracle_hook(args.data_dir, args.annotations, args.size, args.max_size),
                                    with_kwargs=True)
        return model
    eval_coco.load_detr = hooked
    return eval_coco.main(argv)


@pytest.mark.slow
def test_eval_coco_on_two_ranks_equals_one_process(request, tmp_path, one_thread):
    """COCO AP of the oracle detector on 5 images over 2 ranks (3 + 2): that of one process."""
    if coco_set is None:
        pytest.skip("needs transformers and pycocotools")
    root = request.getfixturevalue("coco_set")
    args = ["--config", str(root / "config.json"), "--checkpoint", str(root / "detr.pt"), "--data-dir", str(root),
            "--annotations", str(root / "ann.json"), "--size", "48", "--max-size", "64", "--max-images", "5",
            "--batch-size", "2", "--workers", "0", "--runs", "1", "--flops-images", "1", "--device", "cpu"]
    one = coco_oracle_main(args + ["--json", str(tmp_path / "one.json")])
    torchrun(os.path.abspath(__file__), args + ["--json", str(tmp_path / "two.json")])
    two = rows_of(tmp_path / "two.json")
    for row in one:
        assert 0.2 < row["AP"] < 0.95  # the oracle's shifted boxes: neither trivial nor zero
        other = two[row["model"]]
        assert (other["AP"], other["AP50"], other["AP75"]) == (row["AP"], row["AP50"], row["AP75"])
        assert other["images_per_rank"] == [3, 2] and row["images_per_rank"] == [5]


if __name__ == "__main__":
    coco_oracle_main(sys.argv[1:])
