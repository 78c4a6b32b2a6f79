"""Train Focus-DETR's foreground scorer on a frozen DETR.

    python experiments/training/train_focus_scorer.py --model facebook/detr-resnet-50 --pretrained \
        --data-dir coco/train2017 --annotations coco/annotations/instances_train2017.json \
        --epochs 2 --batch-size 8 --lr 1e-3 --output focus_scorer_detr_r50.pt

The detector is frozen and never updated; only the scorer head learns. Its input is what the
DETR hands its encoder (projected backbone features plus position embeddings). Targets are
FCOS-style: a feature location is foreground when it lies inside a ground-truth box (the smallest
box wins where boxes overlap; DETR's single level takes every box size). Loss: sigmoid focal loss
(alpha 0.25, gamma 2) over the real (unpadded) locations, divided by the number of foreground
locations. The head is saved with its configuration and loads with

    vitcompress.compress(model, "focus_detr", scorer="learned", scorer_path="focus_scorer_detr_r50.pt")

Local models: ``--config CONFIG.json --checkpoint STATE_DICT.pt`` or ``--checkpoint DIR``
(a ``save_pretrained`` directory).
"""
import argparse

import torch
from torchvision.ops import sigmoid_focal_loss
from tqdm.auto import tqdm

from vitcompress.adapters.detr import detr_parts, encoder_inputs, encoder_position_embeddings
from vitcompress.cli.script_arguments import add_coco_arguments, add_detr_arguments
from vitcompress.evaluation.classification import autocast
from vitcompress.evaluation.coco import CocoDetection, foreground_targets, load_detr, loader
from vitcompress.methods.focus_detr import FocusScorer, foreground_logits, save_scorer


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detr_arguments(ap)
    add_coco_arguments(ap)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=None, help="scorer hidden width (default: the model's d_model)")
    ap.add_argument("--amp", action="store_true", help="run the frozen detector in mixed precision")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True, help="where to save the trained head (.pt)")
    return ap.parse_args(argv)


def encoder_features(model, pixel_values, pixel_mask):
    """``(tokens + position embeddings [B, C, H, W], real-location mask [B, H, W])`` of a frozen DETR."""
    detr = detr_parts(model)[0]
    shape = {}
    handle = detr.input_projection.register_forward_hook(lambda m, i, out: shape.update(hw=out.shape[-2:]))
    try:
        inputs = encoder_inputs(model, pixel_values, pixel_mask)
    finally:
        handle.remove()
    tokens = (inputs["inputs_embeds"] + encoder_position_embeddings(inputs)).float()
    B, N, C = tokens.shape
    H, W = shape["hw"]
    return tokens.transpose(1, 2).reshape(B, C, H, W), inputs["attention_mask"].bool().reshape(B, H, W)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = load_detr(args.model, args.pretrained, args.config, args.checkpoint).to(device)
    model.requires_grad_(False)
    dataset = CocoDetection(args.data_dir, args.annotations, args.size, args.max_size, args.max_images)
    batches = loader(dataset, args.batch_size, args.workers, shuffle=True)
    head = FocusScorer(model.config.d_model, args.hidden).to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    losses = []
    for epoch in range(args.epochs):
        total, steps = 0.0, 0
        for pixel_values, pixel_mask, targets in tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            pixel_values, pixel_mask = pixel_values.to(device), pixel_mask.to(device)
            with torch.no_grad(), autocast(device, args.amp):
                feats, valid = encoder_features(model, pixel_values, pixel_mask)
            logits = foreground_logits(head, [feats], [valid])[0].reshape(valid.shape[0], -1)
            target = foreground_targets(targets, tuple(valid.shape[1:]), tuple(pixel_values.shape[-2:]), valid)
            real = valid.reshape(valid.shape[0], -1)
            loss = sigmoid_focal_loss(logits[real], target[real], alpha=0.25, gamma=2.0, reduction="sum")
            loss = loss / target.sum().clamp(min=1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(steps, 1))
        print(f"epoch {epoch + 1}/{args.epochs}  focal loss {losses[-1]:.4f}")
    save_scorer(head.cpu().eval(), args.output, model=args.model or args.config or args.checkpoint,
                epochs=args.epochs, losses=losses)
    print(f"saved the scorer head to {args.output}")
    return losses


if __name__ == "__main__":
    main()
