#!/usr/bin/env python3
r"""Record the official VisionZip and CDPruner selections that ``tests/test_official_visionzip_cdpruner.py``
checks in every run.

    # the official repositories (or the fetch tool's snapshots), and transformers 4.37.2 (the version both
    # pin; their patches do not run on transformers 5) installed apart:
    pip install --target /tmp/tf437_site --no-deps transformers==4.37.2 tokenizers==0.15.1 huggingface_hub==0.20.3
    python experiments/tools/record_official_visionzip_cdpruner.py --fetch /tmp/official_vzcd
    python experiments/tools/record_official_visionzip_cdpruner.py --official-dir /tmp/official_vzcd
    python experiments/tools/record_official_visionzip_cdpruner.py --official-dir /tmp/official_vzcd --onevision

This process builds the tiny random-weight models of ``vitcompress.testing`` and their inputs with the
project's transformers, then runs the official code in a second Python process on ``--tf4-site`` (the
weights go across in a temporary file); nothing of the official code is stored. Recorded
(``tests/data/official_visionzip_cdpruner.pt``):

* ``visionzip``: ``CLIPVisionTower_VisionZip.forward`` (``visionzip/clip_encoder.py``) with the official
  ``apply_info`` and the patched ``CLIPEncoderLayer`` / ``CLIPAttention`` forwards (``visionzip/utils.py``) on
  the 24-layer tower of ``tiny_llava_576()`` (576 patches, as LLaVA-1.5), for the paper's
  three splits 54+10, 108+20, 162+30: the kept dominant patches, and for 54+10 the tokens it returns
  (before the projector). Shim: none; ``self`` is a namespace holding the tower, its device and dtype.
  ``visionzip.next``: on ``tiny_llava_next_576()`` (crops of 24 x 24 patches; images of 1 + 2 and 1 + 4
  crops), the same forward per image, the projector, and the packing of its ``spatial_unpad`` branch
  (base crop, then ``restore_image_features_sorted`` with the crop grid's shape, which the official code
  takes from LLaVA's ``get_anyres_image_grid_shape`` and this script from transformers' equal one; its
  ``import llava.mm_utils`` is served by CDPruner's copy of LLaVA): the tokens the language model gets
  (54 + 10).
* ``cdpruner``: ``LlavaMetaForCausalLM.encode_images`` (``llava/model/llava_arch.py``) with the official
  ``CLIPVisionTower.forward`` (``llava/model/multimodal_encoder/clip_encoder.py``, feature layer -2, patches)
  on the same LLaVA-1.5 tower (64 / 128 / 192 tokens) and on the crops of ``tiny_llava("next")``'s two images
  (16 tokens per crop), one image and its question per call: the index masks. The text tower is
  ``tiny_llava_clip``'s (loaded into ``CLIPTextModelWithProjection``), the tokenizer ``char_tokenizer``.
  Shim: ``torch.cuda.Stream`` / ``stream`` / ``synchronize`` are no-ops (the tower's forward runs its image
  and text encoders on two CUDA streams), and ``self`` is a namespace (``get_model()``, ``visual_token_num``).
* ``--onevision`` (``tests/data/official_onevision_cdpruner.pt``): CDPruner has no LLaVA-OneVision code; its
  ``encode_images`` on each image's crops and each video's frames of ``tiny_llava_onevision_siglip()`` (12
  tokens per crop / frame), the tower a function returning the SigLIP feature layer with the patch and question
  embeddings of ``projection_embeddings`` (``official_cdpruner_onevision``): the index masks.
"""
from __future__ import annotations

import contextlib
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

VZ_URL, VZ_COMMIT = "https://github.com/dvlab-research/VisionZip", "3151f6df4fca36a4cd1c985e5956e725b1f9ad02"
CD_URL, CD_COMMIT = "https://github.com/Theia-4869/CDPruner", "9541616c40fcd5625de1cdb8ea6c33c129eb7864"
REPOS = {"VisionZip": (VZ_URL, VZ_COMMIT), "CDPruner": (CD_URL, CD_COMMIT)}
DEFAULT_OUT = os.path.join(_ROOT, "tests", "data", "official_visionzip_cdpruner.pt")

VZ_SPLITS = [(54, 10), (108, 20), (162, 30)]  # the paper's 64 / 128 / 192 of LLaVA-1.5's 576
CD_TOKENS = [64, 128, 192]
NEXT_TOKENS = 16
QUESTIONS = ["What is the man holding in his left hand?", "Is there a red car parked next to the small house on the "
             "left side of the street?", "Count the birds.", "Which sign is larger?"]


def llava_images(count: int = 4) -> torch.Tensor:
    """The LLaVA-1.5 images of the recording (the test makes the same)."""
    return torch.randn(count, 3, 96, 96, generator=torch.Generator().manual_seed(11))


# ------------------------------------------------------------------ the official side (transformers 4.37)
def _package(name: str, folder: str) -> None:
    module = types.ModuleType(name)
    module.__path__ = [folder]
    sys.modules[name] = module


def _clip_vision(config: dict, state: dict):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = CLIPVisionModel(CLIPVisionConfig(**config)).eval()
    tower.vision_model.load_state_dict(state)
    return tower


def official_visionzip(root: str, blob: dict) -> list:
    _package("visionzip", os.path.join(root, "VisionZip", "visionzip"))
    utils = importlib.import_module("visionzip.utils")
    encoder = importlib.import_module("visionzip.clip_encoder")
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer

    originals = CLIPEncoderLayer.forward, CLIPAttention.forward
    CLIPEncoderLayer.forward = utils.CLIP_EncoderLayer_forward  # what visionzip.main.visionzip() patches
    CLIPAttention.forward = utils.CLIPAttention_forward
    out = dict(llava=[])
    for dominant, contextual in VZ_SPLITS:
        tower = _clip_vision(blob["vz_config"], blob["vz_tower"])
        utils.apply_info(tower, dominant_num=dominant - 1, contextual_num=contextual)  # as visionzip() does
        shim = types.SimpleNamespace(vision_tower=tower, device=torch.device("cpu"), dtype=torch.float32)
        tokens, indices = encoder.CLIPVisionTower_VisionZip.forward(shim, blob["vz_images"])
        out["llava"].append(dict(dominant=dominant, contextual=contextual, kept=(indices[:, 1:] - 1).sort(dim=1).values,
                                 tokens=None if out["llava"] else tokens))  # tokens: the first split's
    out["next"] = official_visionzip_next(root, blob, encoder, utils)
    CLIPEncoderLayer.forward, CLIPAttention.forward = originals  # CDPruner runs the plain tower
    return out


def official_visionzip_next(root: str, blob: dict, encoder, utils) -> list:
    """LLaVA-NeXT: each image's crops through the official tower forward and the projector, then its
    ``prepare_inputs_labels_for_multimodal_visionzip`` branch for ``spatial_unpad`` (base crop, then
    ``restore_image_features_sorted`` of the grid crops) -- the tokens the language model gets."""
    _llava_package(root)
    arch = importlib.import_module("visionzip.llava_arch")
    dominant, contextual = VZ_SPLITS[0]
    projector = _projector(blob["vznext_projector"])
    out = []
    for crops, (rows, columns) in zip(blob["vznext_crops"], blob["vznext_grids"]):
        tower = _clip_vision(blob["vznext_config"], blob["vznext_tower"])
        utils.apply_info(tower, dominant_num=dominant - 1, contextual_num=contextual)
        shim = types.SimpleNamespace(vision_tower=tower, device=torch.device("cpu"), dtype=torch.float32)
        features, keep = encoder.CLIPVisionTower_VisionZip.forward(shim, crops)
        features = projector(features)
        model = types.SimpleNamespace(model=types.SimpleNamespace(image_newline=torch.zeros(features.shape[-1])))
        grid = arch.restore_image_features_sorted(model, features[1:], keep[1:], columns, rows)
        out.append(dict(tokens=torch.cat([features[0], grid]), kept=(keep[:, 1:] - 1).sort(dim=1).values,
                        grid=(rows, columns)))
    return out


def _llava_package(root: str) -> None:
    """LLaVA's ``llava`` package as empty packages over CDPruner's copy of it (VisionZip imports
    ``llava.constants`` and ``llava.mm_utils``; CDPruner is a LLaVA fork)."""
    repo = os.path.join(root, "CDPruner")
    if repo not in sys.path:
        sys.path.insert(0, repo)
    for name in ("llava", "llava.model", "llava.model.multimodal_encoder", "llava.model.multimodal_projector"):
        _package(name, os.path.join(repo, *name.split(".")))


def _projector(weights: dict):
    """LLaVA's mlp2x_gelu projector with the given weights."""
    projector = torch.nn.Sequential(torch.nn.Linear(*weights["0.weight"].shape[::-1]), torch.nn.GELU(),
                                    torch.nn.Linear(*weights["2.weight"].shape[::-1]))
    projector.load_state_dict(weights)
    return projector


def official_cdpruner(root: str, blob: dict) -> dict:
    _llava_package(root)
    torch.cuda.Stream = lambda *a, **k: None  # the shim: CPU, one stream
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    clip_encoder = importlib.import_module("llava.model.multimodal_encoder.clip_encoder")
    arch = importlib.import_module("llava.model.llava_arch")
    from transformers import BatchEncoding, CLIPTextConfig, CLIPTextModelWithProjection

    def tokenizer(text, return_tensors="pt"):  # vitcompress.testing.char_tokenizer, rebuilt here
        ids = [[98] + [2 + ord(ch) % 90 for ch in t] + [99] for t in ([text] if isinstance(text, str) else text)]
        return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), len(ids[0]),
                                                                                             dtype=torch.long)})

    def tower_of(kind):
        tower = clip_encoder.CLIPVisionTower.__new__(clip_encoder.CLIPVisionTower)
        torch.nn.Module.__init__(tower)
        tower.is_loaded, tower.select_layer, tower.select_feature = True, -2, "patch"
        tower.vision_tower = _clip_vision(blob[f"{kind}_config"], blob[f"{kind}_tower"])
        projection = torch.nn.Linear(*blob[f"{kind}_visual_projection"].shape[::-1], bias=False)
        projection.weight.data.copy_(blob[f"{kind}_visual_projection"])
        tower.vision_tower.visual_projection = projection  # as load_text_tower() attaches it
        text = CLIPTextModelWithProjection(CLIPTextConfig(**blob["text_config"])).eval()
        text.load_state_dict(blob[f"{kind}_text"])
        tower.text_tokenizer, tower.text_tower = tokenizer, text
        tower.max_position_embeddings = text.config.max_position_embeddings
        projector = _projector(blob[f"{kind}_projector"])
        model = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=projector)
        return model

    def masks(kind, images, tokens):
        shim = types.SimpleNamespace(get_model=lambda: model, visual_token_num=tokens)
        out = []
        for pixels, question in zip(images, QUESTIONS):
            _, mask = arch.LlavaMetaForCausalLM.encode_images(shim, pixels, texts=question)
            out.append(mask)
        return out

    model = tower_of("vz")
    llava = [dict(tokens=t, masks=masks("vz", [x[None] for x in blob["vz_images"]], t)) for t in CD_TOKENS]
    model = tower_of("next")
    nxt = dict(tokens=NEXT_TOKENS, masks=masks("next", blob["next_crops"], NEXT_TOKENS))
    return dict(llava=llava, next=nxt)


def official_step(root: str, blob_path: str, out_path: str) -> None:
    blob = torch.load(blob_path, weights_only=False)
    if "onevision" in blob:
        torch.save(official_cdpruner_onevision(root, blob["onevision"]), out_path)
        return
    torch.save(dict(visionzip=official_visionzip(root, blob), cdpruner=official_cdpruner(root, blob)), out_path)


# ------------------------------------------------------------------ this side (the project's transformers)
def _tower_blob(prefix: str, model) -> dict:
    from vitcompress.testing import tiny_llava_clip

    tower = model.model.vision_tower
    clip = tiny_llava_clip(model)
    projector = model.model.multi_modal_projector
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
             "projection_dim")
    text = ("text_model.", "text_projection")
    return {f"{prefix}_config": {k: v for k, v in model.config.vision_config.to_dict().items() if k in shape},
            f"{prefix}_tower": getattr(tower, "vision_model", tower).state_dict(),
            f"{prefix}_visual_projection": clip.visual_projection.weight.detach().clone(),
            f"{prefix}_text": {k: v for k, v in clip.state_dict().items() if k.startswith(text)},
            f"{prefix}_projector": {"0.weight": projector.linear_1.weight, "0.bias": projector.linear_1.bias,
                                    "2.weight": projector.linear_2.weight, "2.bias": projector.linear_2.bias}}


def next_crops(model, inputs) -> list:
    """Each image's real crops (the padded ones dropped), as the official LLaVA-NeXT code gets them."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    count = [image_size_to_num_patches(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                                       patch_size=model.config.vision_config.image_size) for s in inputs["image_sizes"]]
    return [px[:n] for px, n in zip(inputs["pixel_values"], count)]


def record(root: str, out: str, tf4_site: str) -> dict:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    from vitcompress.testing import (LLAVA_CLIP_TEXT, LLAVA_NEXT_576_PINPOINTS, llava_inputs, llava_next_576_inputs,
                                     tiny_llava, tiny_llava_576, tiny_llava_next_576)

    llava, nxt, vznext = tiny_llava_576(), tiny_llava("next"), tiny_llava_next_576()
    crops = next_crops(nxt, llava_inputs(nxt, "next"))
    vznext_inputs = llava_next_576_inputs(vznext)
    blob = dict(_tower_blob("vz", llava), **_tower_blob("next", nxt), **_tower_blob("vznext", vznext),
                vz_images=llava_images(), next_crops=crops, text_config=dict(LLAVA_CLIP_TEXT, projection_dim=16),
                vznext_crops=next_crops(vznext, vznext_inputs),
                vznext_grids=[get_anyres_image_grid_shape(s.tolist(), LLAVA_NEXT_576_PINPOINTS, 96)
                              for s in vznext_inputs["image_sizes"]])
    with tempfile.TemporaryDirectory() as tmp:
        blob_path, result_path = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save(blob, blob_path)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tf4_site, _HERE]))
        subprocess.run([sys.executable, __file__, "--official-step", root, blob_path, result_path], env=env,
                       check=True)
        result = torch.load(result_path, weights_only=False)
    commits = {name: subprocess.run(["git", "-C", os.path.join(root, name), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or commit for name, (_, commit) in REPOS.items()}
    data = dict(commits=commits, questions=QUESTIONS, image_checksum=float(blob["vz_images"].double().sum()),
                crop_checksum=[float(c.double().sum()) for c in crops], **result)
    return official_repos.save(data, out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--official-step":
        official_step(*argv[1:4])
        return 0
    parser = official_repos.arguments(__doc__, REPOS, DEFAULT_OUT, "unused (the inputs are fixed)")
    parser.add_argument("--tf4-site", default="/tmp/tf437_site", help="where transformers 4.37.2 is installed")
    parser.add_argument("--onevision", action="store_true", help=f"record CDPruner on LLaVA-OneVision's crops and "
                        f"frames instead (default --out {os.path.relpath(ONEVISION_OUT, _ROOT)})")
    args = parser.parse_args(argv)
    if args.onevision:
        out = ONEVISION_OUT if args.out == DEFAULT_OUT else args.out
        data = record_onevision(official_repos.official_root(args, REPOS), out, args.tf4_site)
        print(f"recorded CDPruner on {len(data['images'])} OneVision images and {len(data['videos'])} videos into "
              f"{out} ({os.path.getsize(out)} bytes)")
        return 0
    data = record(official_repos.official_root(args, REPOS), args.out, args.tf4_site)
    cases = len(data["visionzip"]["llava"]) + 1, len(data["cdpruner"]["llava"]) + 1
    print(f"recorded {cases[0]} VisionZip and {cases[1]} CDPruner cases from "
          f"{ {k: v[:8] for k, v in data['commits'].items()} } into {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


# ------------------------------------------------------------------ LLaVA-OneVision (SigLIP, no [CLS]): CDPruner
ONEVISION_OUT = os.path.join(_ROOT, "tests", "data", "official_onevision_cdpruner.pt")
ONEVISION_TOKENS = 12
ONEVISION_QUESTIONS = ["what is shown?", "where is the red car?"]


def onevision_blob() -> dict:
    """``tiny_llava_onevision_siglip()``: per image (its crops) and per video (its frames), the tower's
    feature layer and, from ``projection_embeddings``, the patch and question embeddings of the
    sample's question; the projector's weights."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    from vitcompress.testing import onevision_siglip_inputs, projection_embeddings, tiny_llava_onevision_siglip

    model = tiny_llava_onevision_siglip()
    inputs = onevision_siglip_inputs(model)
    config, projector = model.config, model.model.multi_modal_projector

    def case(pixels, question):
        with torch.no_grad():
            features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        image_embeds, text_embeds = projection_embeddings(features, question)
        return dict(features=features, image_embeds=image_embeds, text_embeds=text_embeds, question=question)

    crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints,
                                       patch_size=config.vision_config.image_size) for s in inputs["image_sizes"]]
    return dict(tokens=ONEVISION_TOKENS, questions=ONEVISION_QUESTIONS,
                projector={"0.weight": projector.linear_1.weight, "0.bias": projector.linear_1.bias,
                           "2.weight": projector.linear_2.weight, "2.bias": projector.linear_2.bias},
                images=[case(px[:n], q) for px, n, q in zip(inputs["pixel_values"], crops, ONEVISION_QUESTIONS)],
                videos=[case(px, q) for px, q in zip(inputs["pixel_values_videos"], ONEVISION_QUESTIONS)])


def official_cdpruner_onevision(root: str, blob: dict) -> dict:
    """CDPruner has no LLaVA-OneVision code: its LLaVA ``encode_images`` (the conditional DPP) on each
    image's crops / video's frames, one call each. Shim: the vision tower is a function returning the
    recorded SigLIP features with the patch and question embeddings (where the official CLIP tower
    returns its own; its text tower has no SigLIP counterpart here), ``mm_projector`` OneVision's."""
    _llava_package(root)
    arch = importlib.import_module("llava.model.llava_arch")
    projector = _projector(blob["projector"])
    out = {}
    for unit in ("images", "videos"):
        out[unit] = []
        for case in blob[unit]:
            def tower(images, texts=None, case=case):
                return case["features"], case["image_embeds"], case["text_embeds"]
            model = types.SimpleNamespace(get_vision_tower=lambda tower=tower: tower, mm_projector=projector)
            shim = types.SimpleNamespace(get_model=lambda model=model: model, visual_token_num=blob["tokens"])
            _, masks = arch.LlavaMetaForCausalLM.encode_images(shim, case["features"], texts=case["question"])
            out[unit].append(masks)
    return out


def record_onevision(root: str, out: str, tf4_site: str) -> dict:
    blob = onevision_blob()
    with tempfile.TemporaryDirectory() as tmp:
        blob_path, result_path = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save(dict(onevision=blob), blob_path)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tf4_site, _HERE]))
        subprocess.run([sys.executable, __file__, "--official-step", root, blob_path, result_path], env=env,
                       check=True)
        result = torch.load(result_path, weights_only=False)
    commit = subprocess.run(["git", "-C", os.path.join(root, "CDPruner"), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or CD_COMMIT
    data = dict(commits={"CDPruner": commit}, tokens=blob["tokens"], questions=blob["questions"], **result)
    return official_repos.save(data, out)


if __name__ == "__main__":
    sys.exit(main())
