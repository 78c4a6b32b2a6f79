"""What the record_official*.py scripts share: cloning official repositories at pinned commits, their
command line (``--official-dir`` or ``--fetch``, ``--out``, ``--images``) and writing the record.

Imported by the scripts beside it (run as ``python experiments/tools/record_official*.py``, whose own
folder is then first on ``sys.path``).
"""
import argparse
import os
import subprocess
from typing import Dict, Tuple

import torch


def fetch(dest: str, repos: Dict[str, Tuple[str, str]], pin: bool = True) -> str:
    """Clone each ``name: (url, commit)`` of ``repos`` into ``dest/name`` (kept when already there),
    checked out at its commit unless ``pin=False``; returns ``dest``."""
    for name, (url, commit) in repos.items():
        repo = os.path.join(dest, name)
        if not os.path.isdir(repo):
            subprocess.run(["git", "clone", "--quiet", url, repo], check=True)
        if pin:
            subprocess.run(["git", "-C", repo, "checkout", "--quiet", commit], check=True)
    return dest


def arguments(doc: str, repos: Dict[str, Tuple[str, str]], default_out: str, images_help: str,
              can_unpin: bool = False) -> argparse.ArgumentParser:
    """The recorders' command line: where the official code is (``--official-dir``, or ``--fetch DIR``
    to clone ``repos`` there first), ``--out`` and ``--images``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    holding = " and ".join(name + "/" for name in repos)
    src.add_argument("--official-dir", help=f"folder holding {holding} (already fetched)")
    src.add_argument("--fetch", metavar="DIR", help="git clone the official repositories into DIR, then record")
    if can_unpin:
        ap.add_argument("--no-pin", action="store_true", help="with --fetch: keep the repositories' heads")
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--images", type=int, default=32, help=images_help)
    return ap


def official_root(args, repos: Dict[str, Tuple[str, str]]) -> str:
    """The folder the official code is in: cloned by ``--fetch`` first, or ``--official-dir``."""
    if args.fetch:
        return fetch(args.fetch, repos, pin=not getattr(args, "no_pin", False))
    return args.official_dir


def save(data: dict, out: str) -> dict:
    """``data`` written to ``out`` (its folder created); returned."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(data, out)
    return data
