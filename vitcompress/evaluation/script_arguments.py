"""The arguments several experiment scripts share: the DETR they load and its COCO-format data."""
import argparse


def add_detr_arguments(parser: argparse.ArgumentParser,
                       model_help: str = "transformers model name, e.g. facebook/detr-resnet-50") -> None:
    """The DETR that :func:`vitcompress.evaluation.coco.load_detr` builds: ``--model``,
    ``--pretrained``, ``--config``, ``--checkpoint``."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights (needs a network)")
    parser.add_argument("--config", help="a DetrConfig (JSON file or directory) for a local model")
    parser.add_argument("--checkpoint", help="local weights: a state_dict file, or a save_pretrained directory")


def add_coco_arguments(parser: argparse.ArgumentParser) -> None:
    """The images and annotations of a :class:`vitcompress.evaluation.coco.CocoDetection`."""
    parser.add_argument("--data-dir", required=True, help="folder of the images named in the annotations")
    parser.add_argument("--annotations", required=True, help="COCO-format annotation JSON")
    parser.add_argument("--size", type=int, default=800, help="shortest image side after resizing (DETR: 800)")
    parser.add_argument("--max-size", type=int, default=1333, help="longest image side after resizing (DETR: 1333)")
    parser.add_argument("--max-images", type=int, default=None)
