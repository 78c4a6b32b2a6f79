"""``vitcompress show``: draw which patches each remaining token stands for, on your own images."""
import os
from typing import Any, List, Tuple

from ..evaluation import models
from .arguments import budget_arguments, check_setting, fraction, output_file
from .report import PLOT_EXTENSIONS

HELP = "draw on images which patches each token of a compressed ViT stands for (merged, kept, pruned)"

DESCRIPTION = """\
Draw on each IMAGE which patches every token left by a token-reduction method stands for: merged
tokens as coloured, outlined regions, tokens of one patch as the plain image, pruned patches
hatched grey. --methods a,b,c draws several methods side by side at the same budget; --blocks 3,6
adds the tokens after those blocks (0-based). The images are resized and centre-cropped to the
model's input size.

  vitcompress show photo.jpg --model deit_small_patch16_224 --pretrained \\
      --methods tome,pitome,zero_tprune --flops 0.7 -o out.png
  vitcompress show photo.jpg --model hf:facebook/dinov2-small --keep 0.7   # or hf:DIR (save_pretrained)
  vitcompress show photo.jpg --model open_clip:ViT-B-32/laion2b_s34b_b79k --r 8
"""


def add_arguments(parser) -> None:
    """The arguments of ``vitcompress show``."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (.png, .jpg, ...), one row each")
    parser.add_argument("--model", default=models.REFERENCE, metavar="NAME",
                        help="'reference' (the embedded Fashion-MNIST ViT, 32x32 grey; default), a timm model name, "
                             "hf:NAME_OR_DIR (transformers AutoModel: a hub name, from the local cache offline, or a "
                             "save_pretrained directory) or open_clip:ARCH/TAG (a pretrained tag or a checkpoint file; "
                             "no tag: random weights)")
    parser.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights (needs a network)")
    parser.add_argument("--method", default="tome", metavar="METHOD", help="token-reduction method (default: %(default)s)")
    parser.add_argument("--methods", metavar="A,B,C",
                        help="several methods side by side at the same budget, e.g. tome,pitome,zero_tprune")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--flops", type=fraction, metavar="FRACTION", help="target fraction of the uncompressed FLOPs, in (0, 1]")
    budget.add_argument("--keep", type=fraction, metavar="FRACTION", help="fraction of tokens kept per reducing block, in (0, 1]")
    budget.add_argument("--r", metavar="R", help="tokens removed per block: an int, a list '[8,8,4]' or '(r, inflection)'")
    parser.add_argument("--blocks", metavar="I,J", help="also draw the tokens after these blocks (0-based), e.g. 3,6")
    parser.add_argument("-o", "--out", type=output_file(*PLOT_EXTENSIONS), default="show.png", metavar="FILE",
                        help="the figure to write: .png, .pdf, .svg or .jpg (default: %(default)s)")


def _block_list(text: str) -> List[int]:
    try:
        blocks = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--blocks {text!r}: give block numbers separated by commas, e.g. --blocks 3,6") from None
    if not blocks or min(blocks) < 0:
        raise ValueError(f"--blocks {text!r}: give block numbers >= 0 separated by commas, e.g. --blocks 3,6")
    return blocks


def check_arguments(args, parser) -> None:
    """Check every argument of ``vitcompress show`` before any model is built (``parser.error``: exit 2)."""
    from ..methods import get

    try:
        missing = [path for path in args.images if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"image {missing[0]} does not exist; give the path of an image file (.png, .jpg, ...)")
        models.check_model_name(args.model, args.pretrained, libraries=True)
        args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else [args.method]
        if not args.method_list:
            raise ValueError(f"--methods {args.methods!r}: give method names separated by commas, e.g. "
                             "--methods tome,pitome,zero_tprune")
        budget = budget_arguments(args)
        for method in args.method_list:
            spec = get(method)
            if spec.dynamic:
                raise ValueError(f"{method} chooses a content-dependent number of tokens, which show cannot draw; "
                                 "give a ViT method with a fixed budget: tome, pitome or zero_tprune")
            check_setting(method, budget)
        args.block_list = _block_list(args.blocks) if args.blocks else []
        if args.block_list and len(args.method_list) > 1:
            raise ValueError("--blocks draws one method after several blocks: give --method, not --methods")
    except (ValueError, TypeError) as err:
        parser.error(str(err))


def load_images(paths, loaded: "models.LoadedModel") -> Tuple[Any, Any]:
    """Image files -> ``(inputs, pictures)``: the model's inputs ``[B, C, H, W]`` (resized to cover its
    input size, centre-cropped, normalised as it was trained) and the same crops in [0, 1] to draw on."""
    import numpy as np
    from PIL import Image, ImageOps

    channels, height, width = loaded.input_size
    if loaded.name == models.REFERENCE:
        from ..evaluation import reference_model

        side = height - 2 * reference_model.PAD  # Fashion-MNIST: 28x28 grey, zero padded
        raw = np.stack([np.asarray(ImageOps.fit(Image.open(p).convert("L"), (side, side))) for p in paths])
        inputs = reference_model.preprocess(raw)
        return inputs, (inputs * reference_model.STD + reference_model.MEAN).clamp(0, 1).expand(-1, 3, -1, -1)
    cfg = getattr(loaded.model, "pretrained_cfg", {})  # timm's; the other libraries' loaders give mean and std
    inputs, pictures = photo_inputs(paths, (height, width), loaded.mean or cfg.get("mean", (0.485, 0.456, 0.406)),
                                    loaded.std or cfg.get("std", (0.229, 0.224, 0.225)))
    return inputs[:, :channels], pictures


def photo_inputs(paths, size: Tuple[int, int], mean, std) -> Tuple[Any, Any]:
    """RGB image files -> ``(inputs, pictures)`` at ``size`` (height, width): each resized to cover it
    and centre-cropped; ``pictures`` in [0, 1], ``inputs`` normalised with ``mean`` / ``std``."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    crops = [torch.as_tensor(np.array(ImageOps.fit(Image.open(p).convert("RGB"), (size[1], size[0]),
                                                   Image.Resampling.BICUBIC))) for p in paths]
    pictures = torch.stack(crops).permute(0, 3, 1, 2).float() / 255.0
    return (pictures - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1), pictures


def run(args) -> int:
    """``vitcompress show`` (arguments already checked): load, compress, trace, draw, write."""
    from .. import api, visualize

    loaded = models.load_model(args.model, pretrained=args.pretrained, num_images=0, libraries=True)
    inputs, pictures = load_images(args.images, loaded)
    budget = budget_arguments(args)
    if len(args.method_list) > 1:
        fig = visualize.compare(loaded.model, inputs, args.method_list, pictures=pictures, **budget)
    else:
        api.compress(loaded.model, args.method_list[0], **budget)
        fig = visualize.draw(loaded.model, inputs, blocks=args.block_list, pictures=pictures)
    fig.savefig(args.out, dpi=visualize.DPI)
    width, height = (round(v * visualize.DPI) for v in fig.get_size_inches())
    print(f"wrote {args.out} ({width}x{height} px): {', '.join(args.method_list)} on {models.display_name(args.model)} "
          f"({loaded.weights}), {len(args.images)} image(s)")
    return 0
