"""Zero-shot classification and image-text retrieval of an open_clip model, with and without token
reduction in its image tower: the metrics, the image tower's GFLOPs and images/s in one table.

    # any open_clip model name and pretrained tag (needs a network the first time)
    python experiments/evaluation/eval_clip.py --model ViT-B-32 --pretrained laion2b_s34b_b79k \\
        --data-dir /data/imagenet/val --captions /data/flickr30k/test.tsv --images /data/flickr30k/images \\
        --method pitome --flops 0.6 --amp
    # offline: a local open_clip model config (JSON) and/or a local checkpoint
    python experiments/evaluation/eval_clip.py --model-config my_clip.json --checkpoint my_clip.pt --data-dir ...

Data (give either or both):

* ``--data-dir``: an ImageFolder (one sub-folder per class) for zero-shot classification. Class
  names are the folder names with ``_`` read as spaces, or one per line from ``--classnames`` (in
  sorted folder order). A class's text embedding is the normalised mean over the prompt templates
  (``--template``, repeatable; default: a few photo templates).
* ``--captions``: a UTF-8 text file, one caption per line as ``<image file><TAB><caption>``; an image
  with several captions appears on several lines, and a ``#n`` suffix on the file name is ignored
  (so Flickr30k's ``results_20130124.token`` works as it is). Image paths are relative to
  ``--images`` (default: the captions file's folder). Reported: recall@1/5/10 image->text (an image
  is found when any of its captions ranks in the top k) and text->image, over all images and
  captions in the file; ties count in the query's favour.

The text tower is untouched by ``vitcompress.compress``, so text embeddings are computed once and
shared by both rows. GFLOPs (fvcore, batch 1) and images/s (median of ``--runs`` timed batches)
are those of the image tower, ``model.visual``.

On several devices (or nodes) launch it with torchrun: each rank encodes its own shard of the
images and captions; rank 0 sums the zero-shot hits, gathers the embeddings for retrieval and
prints (images/s: the sum over the ranks, and per rank):

    torchrun --nproc_per_node 8 experiments/evaluation/eval_clip.py --model ViT-B-32 --pretrained ... --data-dir ...
"""
import copy
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import vitcompress
from vitcompress.cli import script_arguments
from vitcompress.cli.arguments import check_device
from vitcompress.cli.settings import BUDGET_KEYS, describe, parse_setting
from vitcompress.evaluation import distributed
from vitcompress.evaluation.classification import autocast, hit_counts, rates, throughput_over_ranks

DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
                     "a photo of the large {}.", "a photo of the small {}.")
RECALL_AT = (1, 5, 10)


def parse_args(argv=None):
    """The arguments, every one checked before a model is built (one line and exit 2 if bad)."""
    ap = script_arguments.parser(__file__, __doc__)
    ap.add_argument("--model", help="open_clip model name (e.g. ViT-B-32); default: the stem of --model-config")
    ap.add_argument("--model-config", help="a local open_clip model config JSON (embed_dim, vision_cfg, text_cfg) "
                                           "registered under its file stem")
    weights = ap.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", help="open_clip pretrained tag, e.g. laion2b_s34b_b79k (needs a network)")
    weights.add_argument("--checkpoint", help="a local open_clip checkpoint (state_dict, .pt/.safetensors)")
    ap.add_argument("--data-dir", help="ImageFolder for zero-shot classification")
    ap.add_argument("--classnames", help="class names, one per line, in sorted folder order")
    ap.add_argument("--template", action="append", help="prompt template with {} for the class name (repeatable)")
    ap.add_argument("--captions", help="retrieval captions: '<image file>\\t<caption>' per line")
    ap.add_argument("--images", help="folder the caption file's image paths are relative to")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    ap.add_argument("--method", choices=vitcompress.list_methods("vit"), help="token-reduction method for the image tower")
    script_arguments.add_budget_arguments(ap, "image tower")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="method option, e.g. --opt margin=0.8 (repeatable)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs for images/s")
    ap.add_argument("--json", help="write the result rows to this JSON file")
    args = ap.parse_args(argv)
    if not (args.model or args.model_config):
        ap.error("give --model NAME or --model-config FILE")
    if not (args.data_dir or args.captions):
        ap.error("nothing to evaluate: give --data-dir (zero-shot) and/or --captions (retrieval)")
    try:
        args.device = check_device(args.device)
        args.options = {}
        for opt in args.opt:  # one KEY=VALUE each, so list values keep their commas
            args.options.update(parse_setting(f"{args.method}:{opt}")[1])
        clash = sorted(set(args.options) & set(BUDGET_KEYS))
        if clash:
            raise ValueError(f"--opt {', '.join(clash)}=...: give budgets as --keep / --r / --flops")
        args.budget = script_arguments.vit_budget(args, args.options)
    except (ValueError, TypeError) as err:
        ap.error(str(err))
    return args


def load_open_clip(args):
    """(model, eval preprocessing, tokenizer) from open_clip: a registered name with a pretrained tag, or
    a local config, optionally with a local checkpoint."""
    import open_clip

    name = args.model
    if args.model_config:
        open_clip.add_model_config(args.model_config)
        name = name or Path(args.model_config).stem
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=args.pretrained)
    except Exception as err:  # unknown name or tag, hub unreachable, ...
        sys.exit(f"eval_clip: cannot create open_clip model {name!r} (pretrained={args.pretrained!r}): {err}")
    if args.checkpoint:
        open_clip.load_checkpoint(model, args.checkpoint)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


class ImageFiles(torch.utils.data.Dataset):
    """Images from a list of paths, preprocessed; the label is the position in the list."""

    def __init__(self, paths: Sequence[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), i


def read_captions(path: str, image_dir=None) -> Tuple[List[str], List[str], torch.Tensor]:
    """(image paths, captions, image index of each caption) from a ``file<TAB>caption`` file."""
    image_dir = Path(image_dir) if image_dir else Path(path).parent
    images: Dict[str, int] = {}
    captions, owner = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            name, tab, caption = line.rstrip("\n").partition("\t")
            if not tab or not caption.strip():
                raise ValueError(f"{path}:{number}: expected '<image file><TAB><caption>', got {line.strip()!r}")
            name = name.split("#")[0].strip()
            owner.append(images.setdefault(name, len(images)))
            captions.append(caption.strip())
    if not captions:
        raise ValueError(f"{path} has no captions")
    paths = [str(image_dir / name) for name in images]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {path} are missing, e.g. {missing[0]} (set --images)")
    return paths, captions, torch.tensor(owner)


def recall_at_k(sim: torch.Tensor, owner: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> Dict[str, float]:
    """Retrieval recall from ``sim[I, T]`` image-caption similarities and ``owner[T]``, the image of
    each caption. A query's rank is the number of candidates scoring strictly higher than its best
    correct one; recall@k is the fraction of queries with rank < k."""
    images = torch.arange(sim.shape[0])
    own = owner[None, :] == images[:, None]  # [I, T]: caption belongs to image
    best_caption = sim.masked_fill(~own, float("-inf")).amax(dim=1)
    image_rank = (sim > best_caption[:, None]).sum(dim=1)
    own_image = sim[owner, torch.arange(sim.shape[1])]
    caption_rank = (sim > own_image[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (image_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (caption_rank < k).float().mean().item()
    return out


def encode_texts(model, tokenizer, texts: Sequence[str], device, batch_size: int, amp: bool) -> torch.Tensor:
    feats = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            with autocast(device, amp):
                feats.append(model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device)).float())
    return F.normalize(torch.cat(feats), dim=-1)


def encode_images(model, loader, device, amp: bool, progress: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised image embeddings and the loader's labels (a progress bar unless ``progress`` is None)."""
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in tqdm(loader, desc=progress, disable=progress is None, leave=False):
            with autocast(device, amp):
                feats.append(model.encode_image(x.to(device, non_blocking=True)).float())
            labels.append(y)
    return F.normalize(torch.cat(feats), dim=-1), torch.cat(labels)


def zero_shot_weights(model, tokenizer, names: Sequence[str], templates: Sequence[str], device, batch_size, amp):
    """``[C, D]``: per class, the normalised mean of its prompts' normalised text embeddings."""
    prompts = [t.format(name) for name in names for t in templates]
    feats = encode_texts(model, tokenizer, prompts, device, batch_size, amp)
    return F.normalize(feats.view(len(names), len(templates), -1).mean(dim=1), dim=-1)


def class_names(dataset, path=None) -> List[str]:
    if path is None:
        return [c.replace("_", " ") for c in dataset.classes]
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != len(dataset.classes):
        raise ValueError(f"{path} lists {len(names)} class names but {dataset.root} has {len(dataset.classes)} classes")
    return names


def evaluate(args, ctx: distributed.Context) -> Optional[List[Dict]]:
    """The rows on rank 0 (None on the other ranks): each rank encodes its shard of the images and
    captions; zero-shot hits are summed and image / caption embeddings gathered for retrieval."""
    from torchvision.datasets import ImageFolder

    device = ctx.device
    with ctx.step("loading the model"):
        model, preprocess, tokenizer = load_open_clip(args)
        model.to(device)
        models = {"uncompressed": model}
        rows = [{"model": "uncompressed", "setting": ""}]
        if args.method:
            models[args.method] = vitcompress.compress(copy.deepcopy(model), args.method, **args.budget, **args.options)
            rows.append({"model": args.method, "setting": describe(dict(args.budget, **args.options))})

    def loader(dataset):  # this rank's shard, the same for every model
        return torch.utils.data.DataLoader(distributed.shard(dataset, ctx), batch_size=args.batch_size,
                                           shuffle=False, num_workers=args.workers)

    # Scores of one model's image embeddings (and labels) on this rank's shard: collectives, so
    # called by every rank; the metrics on rank 0, None on the others.
    def zero_shot(feats, labels):
        top = (feats @ weights.T).topk(min(5, weights.shape[0]), dim=-1).indices.cpu()
        total = distributed.sum_counts(hit_counts(top, labels), ctx)
        return total and {f"zeroshot_{k}": v for k, v in rates(total).items()}

    def retrieval(feats, index):  # an image's label is its position in the caption file's image list
        image_feats = distributed.gather_rows(feats, index, len(paths), ctx)
        return None if image_feats is None else recall_at_k((image_feats @ text_feats.T).cpu(), owner)

    tasks = []
    with ctx.step("reading the data"):
        if args.data_dir:
            dataset = ImageFolder(args.data_dir, transform=preprocess)
            templates = args.template or DEFAULT_TEMPLATES
            weights = zero_shot_weights(model, tokenizer, class_names(dataset, args.classnames), templates, device,
                                        args.batch_size, args.amp)
            tasks.append(("zero-shot", loader(dataset), zero_shot))
        if args.captions:
            paths, captions, owner = read_captions(args.captions, args.images)
            tasks.append(("retrieval", loader(ImageFiles(paths, preprocess)), retrieval))
            mine = torch.tensor(distributed.shard_indices(len(captions), ctx.rank, ctx.world_size))
            text_feats = encode_texts(model, tokenizer, [captions[i] for i in mine], device, args.batch_size,
                                      args.amp)
        sample = next(iter(tasks[0][1]))[0].to(device)
    if args.captions:
        text_feats = distributed.gather_rows(text_feats, mine, len(captions), ctx)

    for row, (name, m) in zip(rows, models.items()):
        for task, data, score in tasks:
            with ctx.step(f"encoding the {task} images with {name}"):
                feats, labels = encode_images(m, data, device, args.amp, f"{name} {task}" if ctx.is_main else None)
            row.update(score(feats, labels) or {})
        with ctx.step(f"counting the FLOPs of {name}"):
            row["gflops"] = vitcompress.count_flops(m.visual, sample[:1]) / 1e9
        if name != "uncompressed":
            row["tokens_per_layer"] = vitcompress.stats(m)["tokens_per_layer"]
    ctx.barrier()  # the ranks time at the same moment, so their images/s add up
    with ctx.step("timing the image towers"), autocast(device, args.amp):
        speed = vitcompress.compare_speed({n: m.visual for n, m in models.items()}, sample, runs=args.runs,
                                          latency=False, memory=False)
    for row, name in zip(rows, models):
        row.update(throughput_over_ranks(speed[name]["throughput"], ctx) or {})
    return rows if ctx.is_main else None


def format_table(rows: List[Dict]) -> str:
    columns = [("zeroshot_top1", "top-1"), ("zeroshot_top5", "top-5")]
    columns += [(f"{d}_r{k}", f"{d} R@{k}") for d in ("i2t", "t2i") for k in RECALL_AT]
    columns = [(key, title) for key, title in columns if key in rows[0]]
    head = (f"{'model':<14}{'setting':<16}" + "".join(f"{t:>10}" for _, t in columns)
            + f"{'GFLOPs':>10}{'% base':>8}{'img/s':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<14}{r['setting']:<16}" + "".join(f"{100 * r[k]:>9.2f}%" for k, _ in columns)
                     + f"{r['gflops']:>10.4f}{100 * r['gflops'] / rows[0]['gflops']:>7.1f}%{r['images_per_s']:>10.1f}")
    for r in rows[1:]:
        lines.append(f"{r['model']} tokens per layer: {r['tokens_per_layer']}")
    return "\n".join(lines)


def main(argv=None):
    distributed.run_script(evaluate, parse_args(argv), format_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
