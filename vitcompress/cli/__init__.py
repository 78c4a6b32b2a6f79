"""The command line: ``vitcompress bench``, ``export``, ``show`` and ``tune``.

Every argument is checked before any model is built: a bad one ends the command at once with a
one-line error naming the fix and exit code 2 (argparse's). One module per command (``bench``,
``export``, ``show``, ``tune``: its arguments, their checks, the run); the checks the commands share, and any script
may reuse, are in :mod:`vitcompress.cli.arguments`; the bench table and plot in ``report``.
"""
import argparse
import sys

from . import bench, export, show, tune
from .arguments import OneLineErrorParser

#: Each command's module: ``HELP``, ``DESCRIPTION``, ``add_arguments``, ``check_arguments``, ``run``.
COMMANDS = {"bench": bench, "export": export, "show": show, "tune": tune}


def _version() -> str:
    from importlib import metadata

    from .. import __version__

    parts = []
    for dist in ("torch", "timm"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return f"vitcompress {__version__}" + (f" ({', '.join(parts)})" if parts else "")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineErrorParser(prog="vitcompress",
                            description="Training-free token reduction for transformers (timm, open_clip, DETR, "
                                        "LLaVA). Run 'vitcompress bench' to see what it does.")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    ap.commands = {}
    for name, command in COMMANDS.items():
        ap.commands[name] = sub.add_parser(name, help=command.HELP, description=command.DESCRIPTION,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(ap.commands[name])
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every argument (no model is built); a bad one exits with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    COMMANDS[args.command].check_arguments(args, parser.commands[args.command])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, TypeError, ImportError, OSError) as err:  # a model's own refusal, a missing extra, ...
        message = " ".join(str(err).split())
        print(f"vitcompress {args.command}: error: {message}", file=sys.stderr)
        return 2
