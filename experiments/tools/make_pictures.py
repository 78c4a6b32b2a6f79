"""Write the pictures the documentation embeds: what each ViT method keeps of real photos.

    PYTHONPATH=$PWD python experiments/tools/make_pictures.py              # -> docs/images/show_*.png
    PYTHONPATH=$PWD python experiments/tools/make_pictures.py --reference  # the embedded model instead

On the real pretrained ViT-S/14 of :mod:`vitcompress.evaluation.realvit` (224 px, 16x16 patches;
build it once with ``python -m vitcompress.evaluation.realvit``) and scikit-image's sample photos
(:func:`vitcompress.evaluation.offline_data.photo_files`); without the ViT-S/14 it says so and falls
back to the embedded reference model (32x32 grey, 8x8 patches). Writes ``show_compare.png`` (every
method side by side at the same FLOPs), ``show_<method>.png`` (one method after blocks 3 and 7 and the
last) and ``show_blocks.png`` (one photo, one method, block after block). The PNGs are quantised to
:data:`COLOURS` colours to stay small in the repository.
"""
import argparse
import io
import os

from tqdm.auto import tqdm

from vitcompress import api, visualize
from vitcompress.cli.show import photo_inputs
from vitcompress.evaluation import offline_data, realvit, reference_model

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "images")
METHODS = ("tome", "pitome", "zero_tprune")
FLOPS = 0.7
COMPARE_PHOTOS = ("chelsea", "astronaut", "coffee")
METHOD_PHOTOS = ("chelsea", "motorcycle_left")
BLOCKS_PHOTO = "astronaut"
COLOURS = 160  # of the quantised PNGs: small files, no visible banding


def load(reference: bool):
    """``(model, its name for the titles, images(photo names) -> (inputs, pictures))``."""
    files = {os.path.basename(f).split(".")[0]: f for f in offline_data.photo_files()}
    if not reference:
        try:
            model = realvit.load_realvit()
            return (model, "real ViT-S/14, 224 px",
                    lambda names: photo_inputs([files[n] for n in names], (realvit.IMG_SIZE,) * 2,
                                               realvit.MEAN, realvit.STD))
        except FileNotFoundError as err:
            print(f"{err}\nfalling back to the reference model")
    from PIL import Image
    import numpy as np

    model = reference_model.load(num_images=0)[0]
    side = 28

    def images(names):
        raw = np.stack([np.asarray(Image.open(files[n]).convert("L").resize((side, side))) for n in names])
        inputs = reference_model.preprocess(raw)
        return inputs, (inputs * reference_model.STD + reference_model.MEAN).clamp(0, 1).expand(-1, 3, -1, -1)
    return model, "reference ViT (Fashion-MNIST), 32 px", images


def save(fig, folder: str, name: str) -> None:
    """``fig`` as a PNG of :data:`COLOURS` colours in ``folder``."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=visualize.DPI)
    path = os.path.join(folder, name)
    Image.open(buffer).convert("RGB").quantize(colors=COLOURS, dither=Image.Dither.NONE).save(path, optimize=True)
    tqdm.write(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", action="store_true", help="use the embedded reference model, not the ViT-S/14")
    ap.add_argument("--out", default=OUT, metavar="FOLDER", help="where to write the pictures (default: docs/images)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model, name, images = load(args.reference)
    depth = len(model.blocks)
    blocks = (3, 7) if depth > 8 else (1, 3)
    with tqdm(total=len(METHODS) + 2, desc="pictures") as progress:
        inputs, pictures = images(COMPARE_PHOTOS)
        save(visualize.compare(model, inputs, METHODS, flops=FLOPS, pictures=pictures,
                               title=name), args.out, "show_compare.png")
        progress.update()
        inputs, pictures = images(METHOD_PHOTOS)
        for method in METHODS:
            api.compress(model, method, flops=FLOPS)
            try:
                save(visualize.draw(model, inputs, blocks=blocks, pictures=pictures, title=name), args.out,
                     f"show_{method}.png")
            finally:
                api.restore(model)
            progress.update()
        inputs, pictures = images((BLOCKS_PHOTO,))
        api.compress(model, "tome", flops=0.5)
        try:
            step = max(1, depth // 4)
            save(visualize.draw(model, inputs, blocks=range(step - 1, depth - 1, step), pictures=pictures,
                                title=name), args.out, "show_blocks.png")
        finally:
            api.restore(model)
        progress.update()


if __name__ == "__main__":
    main()
