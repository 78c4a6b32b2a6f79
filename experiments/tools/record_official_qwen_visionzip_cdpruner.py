#!/usr/bin/env python3
r"""Record the official VisionZip and CDPruner selection rules on the tiny Qwen-VL models, which
``tests/test_official_qwen_visionzip_cdpruner.py`` checks in every run.

    pip install --target /tmp/tf437_site --no-deps transformers==4.37.2 tokenizers==0.15.1 huggingface_hub==0.20.3
    python experiments/tools/record_official_qwen_visionzip_cdpruner.py --fetch /tmp/official_vzcd

Neither official repository has Qwen-VL code (VisionZip 3151f6df and CDPruner 9541616c implement LLaVA
only), so what is recorded is the official LLaVA functions run on the Qwen-VL tower's signals, computed
here from the model with transformers' own code (not vitcompress's): per image of ``qwen_images()``, for
each tower ``layer``, the attention each merged token receives (the softmax of the layer's rotary q and
k over the whole image, averaged over queries and heads, summed over the token's 2 x 2 patches), its key
(k before the rotary positions, averaged over heads, the 4 patches concatenated), the merger's input
(the 4 patches' features concatenated), the merger's output and the language model's embedding of the
question's characters (``vitcompress.testing.qwen_char_tokenizer``). The official code runs in a second
process on transformers 4.37.2 (VisionZip does not import on transformers 5); nothing of it is stored.

* ``visionzip``: ``CLIPVisionTower_VisionZip.forward`` (``visionzip/clip_encoder.py``). Shim: ``self`` is a
  namespace whose ``vision_tower(...)`` returns, at index -2, an attention map with one head whose [CLS]
  row holds the received attention, hidden states = the merger inputs and ``encoder.layers[-2].metric`` =
  the keys, each after a zero [CLS] row; ``_info`` set as ``apply_info`` sets it with ``dominant_num`` =
  the Qwen token count (the stand-in [CLS], which the official code always keeps, is dropped after).
  Recorded: the kept dominant tokens and, for the first split, the tokens returned (before the merger).
* ``cdpruner``: ``LlavaMetaForCausalLM.encode_images`` (``llava/model/llava_arch.py``). Shim: ``self`` a
  namespace whose vision tower returns (the merger inputs, the merger outputs as the image embeddings,
  the question embeddings as the text embeddings) and whose ``mm_projector`` returns the merger outputs.
  Recorded: the index masks.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import types

import torch

import official_repos  # the folder of this script: experiments/tools/

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))

REPOS = {"VisionZip": ("https://github.com/dvlab-research/VisionZip", "3151f6df4fca36a4cd1c985e5956e725b1f9ad02"),
         "CDPruner": ("https://github.com/Theia-4869/CDPruner", "9541616c40fcd5625de1cdb8ea6c33c129eb7864")}
DEFAULT_OUT = os.path.join(_ROOT, "tests", "data", "official_qwen_visionzip_cdpruner.pt")
KINDS = ("qwen2", "qwen2_5", "qwen3")
LAYERS = (-1, -2)  # the layer the merger reads (the official pairing), and the option's default
VZ_SPLITS = [(6, 2), (10, 4)]  # of the images' 24 and 16 tokens
CD_TOKENS = [4, 8]
QUESTION = "What is on the left?"


# ------------------------------------------------------------------ the official side (transformers 4.37)
def _package(name: str, folder: str) -> None:
    module = types.ModuleType(name)
    module.__path__ = [folder]
    sys.modules[name] = module


def _with_cls(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.new_zeros(1, x.shape[-1]), x])[None]


def official_visionzip(root: str, image: dict) -> list:
    _package("visionzip", os.path.join(root, "VisionZip", "visionzip"))
    encoder = importlib.import_module("visionzip.clip_encoder")
    N = image["attention"].shape[0]
    attention = torch.zeros(1, 1, N + 1, N + 1)
    attention[0, 0, 0, 1:] = image["attention"]
    hidden, metric = _with_cls(image["hidden"]), _with_cls(image["keys"])
    out = []
    for dominant, contextual in VZ_SPLITS:
        tower = lambda *args, **kwargs: types.SimpleNamespace(attentions=(attention, None),  # noqa: E731
                                                              hidden_states=(hidden, None))
        tower.vision_model = types.SimpleNamespace(encoder=types.SimpleNamespace(
            layers=[types.SimpleNamespace(metric=metric), None]))
        tower._info = {"r": None, "dominant": dominant, "contextual": contextual}
        shim = types.SimpleNamespace(vision_tower=tower, device=torch.device("cpu"), dtype=torch.float32)
        tokens, indices = encoder.CLIPVisionTower_VisionZip.forward(shim, torch.zeros(1))
        out.append(dict(dominant=dominant, contextual=contextual, kept=(indices[0, 1:] - 1).sort().values,
                        tokens=None if out else tokens[0, 1:].clone()))  # the first split's
    return out


def official_cdpruner(root: str, image: dict) -> list:
    repo = os.path.join(root, "CDPruner")
    if repo not in sys.path:
        sys.path.insert(0, repo)
    for name in ("llava", "llava.model", "llava.model.multimodal_encoder", "llava.model.multimodal_projector"):
        _package(name, os.path.join(repo, *name.split(".")))
    arch = importlib.import_module("llava.model.llava_arch")
    projected, hidden = image["projected"][None], image["hidden"][None]

    def tower(images, texts=None):
        return hidden, projected, image["text"]

    def projector(features):
        assert features is hidden
        return projected

    out = []
    for tokens in CD_TOKENS:
        model = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=projector)
        shim = types.SimpleNamespace(get_model=lambda: model, visual_token_num=tokens)
        _, masks = arch.LlavaMetaForCausalLM.encode_images(shim, torch.zeros(1), texts=[QUESTION])
        out.append(dict(tokens=tokens, kept=masks[0].nonzero().flatten()))
    return out


def official_step(root: str, blob_path: str, out_path: str) -> None:
    blob = torch.load(blob_path, weights_only=False)
    result = {key: dict(visionzip=official_visionzip(root, image), cdpruner=official_cdpruner(root, image))
              for key, image in blob.items()}
    torch.save(result, out_path)


# ------------------------------------------------------------------ this side: the tower's signals
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]], dim=-1)


def image_signals(model, kind: str, pixel_values, grid, layer: int) -> list:
    """Per image: the merged tokens' received attention and keys at ``layer``, the merger's input and output."""
    visual, seen = model.model.visual, {}
    block = visual.blocks[layer]
    hooks = [block.attn.qkv.register_forward_hook(lambda m, a, out: seen.__setitem__("qkv", out)),
             block.attn.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("rope", kw["position_embeddings"]),
                                                  with_kwargs=True),
             visual.merger.register_forward_pre_hook(lambda m, a: seen.__setitem__("merger", a[0]))]
    with torch.no_grad():
        model.model.get_image_features(pixel_values, grid)
    for hook in hooks:
        hook.remove()
    unit = visual.spatial_merge_size ** 2
    tower_of_patch = torch.arange(int(grid.prod(-1).sum()))  # where each patch (image order) is in the tower
    if kind == "qwen2_5":  # the tower runs its patches in attention-window order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        in_windows = (window_index[:, None] * unit + torch.arange(unit)).flatten()  # tower slot -> patch
        tower_of_patch = torch.empty_like(tower_of_patch)
        tower_of_patch[in_windows] = torch.arange(len(in_windows))
    heads, scale = block.attn.num_heads, block.attn.scaling
    qkv = seen["qkv"][tower_of_patch]
    cos, sin = (r[tower_of_patch][:, None] for r in seen["rope"])
    merger_in = seen["merger"][tower_of_patch]
    out, first = [], 0
    for patches in grid.prod(-1).tolist():
        span = slice(first, first + patches)
        first += patches
        q, k, _ = qkv[span].reshape(patches, 3, heads, -1).unbind(1)
        q_rot, k_rot = q * cos[span] + rotate_half(q) * sin[span], k * cos[span] + rotate_half(k) * sin[span]
        weights = torch.einsum("qhd,khd->hqk", q_rot, k_rot).mul(scale).softmax(dim=-1)  # [H, P, P]
        received = weights.mean(dim=(0, 1)).reshape(-1, unit).sum(dim=-1)
        hidden = merger_in[span].reshape(patches // unit, -1)
        with torch.no_grad():
            projected = visual.merger(merger_in[span])
            text = model.get_input_embeddings()(torch.tensor([3 + ord(ch) % 90 for ch in QUESTION]))
        out.append(dict(attention=received, keys=k.mean(dim=1).reshape(patches // unit, -1), hidden=hidden,
                        projected=projected, text=text))
    return out


def record(root: str, out: str, tf4_site: str) -> dict:
    from vitcompress.testing import qwen_images, qwen_processors, tiny_qwen_vl

    image_processor, _ = qwen_processors()
    px = image_processor(qwen_images(), return_tensors="pt", do_rescale=False)
    blob = {}
    for kind in KINDS:
        model = tiny_qwen_vl(kind)
        for layer in LAYERS:
            for i, image in enumerate(image_signals(model, kind, px["pixel_values"], px["image_grid_thw"], layer)):
                blob[kind, layer, i] = {k: v.detach() for k, v in image.items()}
    with tempfile.TemporaryDirectory() as tmp:
        blob_path, result_path = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save(blob, blob_path)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tf4_site, _HERE]))
        subprocess.run([sys.executable, __file__, "--official-step", root, blob_path, result_path], env=env,
                       check=True)
        result = torch.load(result_path, weights_only=False)
    commits = {name: subprocess.run(["git", "-C", os.path.join(root, name), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or commit for name, (_, commit) in REPOS.items()}
    data = dict(commits=commits, question=QUESTION, pixel_checksum=float(px["pixel_values"].double().sum()),
                official=result)
    return official_repos.save(data, out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--official-step":
        official_step(*argv[1:4])
        return 0
    parser = official_repos.arguments(__doc__, REPOS, DEFAULT_OUT, "unused (the inputs are fixed)")
    parser.add_argument("--tf4-site", default="/tmp/tf437_site", help="where transformers 4.37.2 is installed")
    args = parser.parse_args(argv)
    data = record(official_repos.official_root(args, REPOS), args.out, args.tf4_site)
    print(f"recorded {len(data['official'])} images x layers of {len(KINDS)} Qwen-VL models from "
          f"{ {k: v[:8] for k, v in data['commits'].items()} } into {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
