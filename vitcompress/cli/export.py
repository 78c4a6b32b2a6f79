"""``vitcompress export``: a compressed model to ONNX (or int8), checked against PyTorch."""
from ..evaluation import models
from .arguments import (budget_arguments, check_output_file, check_setting, fraction, int_at_least, non_negative_float,
                        output_file)

HELP = "export a compressed model to ONNX and check it in onnxruntime against PyTorch"

DESCRIPTION = """\
Export a compressed model to ONNX (dynamic batch), check it with onnx.checker and compare
onnxruntime (or --runtime openvino) with PyTorch: the embedded reference model on its real images
by default, or --model NAME (timm) on random inputs. --quantize int8 writes an int8 file (linear
layers only; token selection stays in float) judged by top-1 agreement with the fp32 model.
Needs pip install "vitcompress[export]" (OpenVINO: "vitcompress[edge]").
"""


def add_arguments(parser) -> None:
    """The arguments of ``vitcompress export``."""
    parser.add_argument("--model", default=models.REFERENCE, metavar="NAME",
                        help="'reference' (the embedded Fashion-MNIST ViT, checked on its real images; default) "
                             "or a timm model name (checked on random inputs)")
    parser.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights (needs a network)")
    parser.add_argument("--method", default="tome", metavar="METHOD",
                        help="token-reduction method, or 'none' to export uncompressed (default: %(default)s)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=fraction, metavar="FRACTION", help="fraction of tokens kept per reducing block, in (0, 1]")
    budget.add_argument("--r", metavar="R", help="tokens removed per block: an int, a list '[8,8,4]' or '(r, inflection)'")
    budget.add_argument("--flops", type=fraction, metavar="FRACTION", help="target fraction of the uncompressed FLOPs, in (0, 1]")
    parser.add_argument("--out", type=output_file(".onnx"), metavar="FILE", help="output .onnx file (default: <model>-<method>.onnx, "
                        "<model>-<method>-int8.onnx with --quantize int8)")
    parser.add_argument("--batch-size", type=int_at_least(1, "--batch-size 8"), default=8, metavar="N",
                        help="batch of the example input and of the real-image check (default: %(default)s)")
    parser.add_argument("--img-size", type=int_at_least(1, "--img-size 224"), metavar="PIXELS", help="input height and width (default: the model's)")
    parser.add_argument("--opset", type=int_at_least(1, "--opset 18"), default=None, metavar="N",
                        help="ONNX opset, >= 17 (default: 18, the native opset of torch's ONNX exporter)")
    parser.add_argument("--num-images", type=int_at_least(1, "--num-images 512"), default=512, metavar="N",
                        help="real images checked with the reference model (default: %(default)s)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic batch dimension")
    parser.add_argument("--no-optimize", action="store_true", help="skip onnxscript's graph optimiser")
    parser.add_argument("--atol", type=non_negative_float, default=1e-4, metavar="TOL",
                        help="largest accepted max abs difference (default: %(default)s)")
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="runtime the file is checked in (default: %(default)s; openvino needs "
                             "pip install 'vitcompress[edge]')")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="write an int8 file (onnxruntime static quantization of the linear layers, QDQ) "
                             "judged by top-1 agreement with the fp32 model instead of --atol")
    parser.add_argument("--calibration-images", type=int_at_least(1, "--calibration-images 64"), default=None,
                        metavar="N", help="int8 calibration images: reference images for the reference model, "
                                          "random-normal inputs otherwise (default: 64)")
    parser.add_argument("--float-reductions", type=int_at_least(0, "--float-reductions 2"), default=None,
                        metavar="N", help="int8: the linear layers feeding the first N token reductions stay in "
                                          "float, where a choice flipped by int8 noise changes the most (default: 2)")
    parser.add_argument("--min-agreement", type=fraction, default=0.99, metavar="FRACTION",
                        help="least top-1 agreement accepted for --quantize int8 (default: %(default)s)")


def check_arguments(args, parser) -> None:
    """Check every argument of ``vitcompress export`` before any model is built (``parser.error``: exit 2)."""
    try:
        models.check_model_name(args.model, args.pretrained)
        if args.model == models.REFERENCE:
            side = models.reference_input_size()[-1]
            if args.img_size is not None and args.img_size != side:
                raise ValueError(f"--img-size {args.img_size}: the reference model takes {side}x{side} images "
                                 "(drop --img-size)")
            if args.static_batch and args.num_images % args.batch_size:
                raise ValueError(f"--num-images {args.num_images} does not fill whole batches of {args.batch_size} "
                                 "(--static-batch): give a multiple of --batch-size")
        from ..export import DEFAULT_OPSET, MIN_OPSET

        args.opset = DEFAULT_OPSET if args.opset is None else args.opset
        if args.opset < MIN_OPSET:
            raise ValueError(f"--opset {args.opset}: vitcompress exports ONNX opset {MIN_OPSET} or newer; "
                             f"give e.g. --opset {DEFAULT_OPSET}")
        if args.quantize and args.runtime != "onnxruntime":
            raise ValueError(f"--quantize int8 writes onnxruntime's QDQ format and is checked in onnxruntime: "
                             f"drop --runtime {args.runtime}")
        if not args.quantize and args.calibration_images is not None:
            raise ValueError("--calibration-images applies to --quantize int8")
        if not args.quantize and args.float_reductions is not None:
            raise ValueError("--float-reductions applies to --quantize int8")
        if args.quantize and args.static_batch and (args.calibration_images or 64) % args.batch_size:
            raise ValueError(f"--calibration-images {args.calibration_images or 64} does not fill whole batches of "
                             f"{args.batch_size} (--static-batch): give a multiple of --batch-size")
        if args.runtime == "openvino":
            import importlib.util

            if importlib.util.find_spec("openvino") is None:
                raise ValueError("--runtime openvino needs the openvino package: pip install 'vitcompress[edge]'")
        budget = budget_arguments(args)
        if args.method == "none":
            if budget:
                raise ValueError("--keep / --r / --flops need a compression --method (not none)")
        else:
            check_setting(args.method, budget, exportable=True)
        if args.out is None:
            suffix = f"-{args.quantize}" if args.quantize else ""  # fp32 and int8 files of one model side by side
            args.out = check_output_file(f"{args.model.replace('/', '_')}-{args.method}{suffix}.onnx", (".onnx",))
    except (ValueError, TypeError) as err:
        parser.error(str(err))


def run(args) -> int:
    """``vitcompress export`` (arguments already checked): build, compress, export, check; 0 when
    the runtime matches PyTorch (int8: top-1 agreement of at least --min-agreement)."""
    from .. import api
    from ..export import CALIBRATION_IMAGES, FLOAT_REDUCTIONS, export_onnx

    calibrate = args.calibration_images or CALIBRATION_IMAGES
    reference = args.model == models.REFERENCE
    wanted = max(args.num_images, calibrate) if reference and args.quantize else args.num_images
    loaded = models.load_model(args.model, pretrained=args.pretrained, img_size=args.img_size, num_images=wanted)
    model, inputs = loaded.model, loaded.images
    channels, size, _ = loaded.input_size
    calibration = None
    if args.quantize:
        if reference:
            calibration, inputs = inputs[:calibrate], inputs[:args.num_images]
            print(f"int8 calibration: the first {calibrate} reference images")
        else:  # no images ship with this model: export_onnx makes (and reports) random-normal ones
            calibration = calibrate
    if args.method != "none":
        api.compress(model, args.method, **budget_arguments(args))
        stats = api.stats(model)
        print(f"{args.model}: {args.method} {stats['budget']}, tokens per block {stats['planned_tokens_per_layer']}")
    report = export_onnx(model, args.out, (args.batch_size, channels, size, size), opset=args.opset,
                         dynamic_batch=not args.static_batch, inputs=inputs, atol=args.atol,
                         optimize=not args.no_optimize, runtime=args.runtime, quantize=args.quantize,
                         calibration=calibration, min_match=args.min_agreement if args.quantize else 0.99,
                         float_reductions=FLOAT_REDUCTIONS if args.float_reductions is None else args.float_reductions,
                         verbose=True)
    return 0 if report.ok else 1
