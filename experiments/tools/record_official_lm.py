#!/usr/bin/env python3
r"""Record the official FastV, PyramidDrop and DART selections that ``tests/test_official_lm_recorded.py`` checks.

    python experiments/tools/record_official_lm.py --fetch /tmp/official_lm
    # or from a folder already holding FastV/, PyramidDrop/ and DART/:
    PYTHONPATH=$PWD python experiments/tools/record_official_lm.py --official-dir /tmp/official_lm

Both selections are inline in the official LLaMA forwards (transformers 4.3x forks), which do not
import next to transformers 5; the smallest shim runs the official text itself:

* FastV (github.com/pkunlp-icler/FastV, ``src/FastV/llava-hf/.../modeling_llama.py``): the lines of the
  in-place forward from ``last_layer_attention = layer_outputs[1]`` to ``keep_indexs.sort()``, executed
  on the attention probabilities that the tiny random LLaVA (``vitcompress.testing.tiny_llava_lm``,
  8 language-model layers) computes in layer K with eager attention (``output_attentions=True``):
  the kept positions ``keep_indexs``.
* PyramidDrop (github.com/Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``): the
  method ``pdrop_rank_drop`` (with the file's ``apply_rotary_pos_emb``), called with a stand-in
  ``self`` (the tiny model's layer ``rank_layer`` as ``self.layers[rank_layer]``, its rotary table as
  ``rotary_emb``) on the hidden states entering each stage boundary, at the positions vitcompress
  gives them (the original ones; see docs/methods/pyramiddrop.md): the kept visual positions per
  stage, read off which input rows its output holds. The official code needs as many key as query
  heads (no ``repeat_kv``): the model has 4 of each.
* DART (github.com/ZichenWen1/DART at 9fee9fa, the author's last change to
  ``llava/model/language_model/modeling_llama_self.py``; recorded here from the fork
  github.com/xqy1111111/DART, whose history holds that commit, as the original could not be fetched
  in this environment): the method ``get_retained_image_token`` called on layer K's keys (the model's
  own rotary and ``repeat_kv`` on its captured k projection, as the official attention returns them)
  and that layer's output through the final norm, for prompts with five text tokens after the image
  (the official code takes ``pivot_text_token`` of them): the kept visual positions.

Nothing of the official code is stored: ``tests/data/official_lm_prune.pt`` holds the cases (which
sample, checksums of the inputs and the model's weights) and the official selections.
"""
from __future__ import annotations

import ast
import copy
import os
import sys
import textwrap
from types import SimpleNamespace

import torch

import vitcompress
from vitcompress.testing import LLAVA_IMAGE_TOKEN, llava_inputs, tiny_llava_lm

import official_repos  # the folder of this script: experiments/tools/

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FASTV_URL, FASTV_COMMIT = "https://github.com/pkunlp-icler/FastV", "d1659729b5bf1be225e99ee15783deeea80f63b1"
PDROP_URL, PDROP_COMMIT = "https://github.com/Cooperx521/PyramidDrop", "6444f304aee4b7edcb022839fb9e8cd07859704a"
DART_URL, DART_COMMIT = "https://github.com/ZichenWen1/DART", "9fee9fa199d591cf91891ad468ab52c754de9bf5"
REPOS = {"FastV": (FASTV_URL, FASTV_COMMIT), "PyramidDrop": (PDROP_URL, PDROP_COMMIT), "DART": (DART_URL, DART_COMMIT)}
FASTV_FILE = "src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py"
PDROP_FILE = "llava/model/modeling_llama_pdrop.py"
DART_FILE = "llava/model/language_model/modeling_llama_self.py"
DEFAULT_OUT = os.path.join(_ROOT, "tests", "data", "official_lm_prune.pt")

#: (model kind, K, R): R is the official drop ratio (vitcompress keep = 1 - R)
FASTV_CASES = [("llava", 2, 0.5), ("llava", 3, 0.75), ("next", 2, 0.5), ("next", 1, 0.3)]
#: (model kind, lambda)
PDROP_CASES = [("llava", 0.5), ("llava", 0.6), ("next", 0.5)]
#: (model kind, K, reduction_ratio, max_num_trunction, pivot_image_token, pivot_text_token)
DART_CASES = [("llava", 2, 0.778, None, 4, 4), ("llava", 2, 0.778, 32, 4, 4), ("next", 2, 0.5, None, 4, 4),
              ("next", 3, 0.778, 40, 2, 3)]
#: text tokens DART samples get after the image (the official code needs pivot_text_token of them)
DART_QUESTION = [11, 12, 13, 14, 15]


def fingerprint(model) -> float:
    """A checksum of the weights: the recording's tiny model must be the test's."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def samples(model, kind):
    """The two prompts of ``llava_inputs`` one at a time, padding removed (the official code takes batch 1);
    ``tests/test_official_lm_recorded.py`` rebuilds them the same way."""
    batch = llava_inputs(model, kind)
    out = []
    for b in range(2):
        real = batch["attention_mask"][b].bool()
        one = {"input_ids": batch["input_ids"][b:b + 1, real], "attention_mask": batch["attention_mask"][b:b + 1, real]}
        one["pixel_values"] = batch["pixel_values"][b:b + 1]
        if kind != "llava":
            one["image_sizes"] = batch["image_sizes"][b:b + 1]
        out.append(one)
    return out


def with_question(sample):
    """``sample`` with :data:`DART_QUESTION` appended to its prompt."""
    extra = torch.tensor([DART_QUESTION])
    return dict(sample, input_ids=torch.cat([sample["input_ids"], extra], 1),
                attention_mask=torch.cat([sample["attention_mask"], torch.ones_like(extra)], 1))


def checksum(sample) -> float:
    return float(sum(v.double().sum() for v in sample.values()))


def official_source(root: str, path: str) -> str:
    with open(os.path.join(root, path)) as f:
        return f.read()


def fastv_block(source: str) -> str:
    """The official selection lines (first occurrence: the KV-cache branch), dedented."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if "last_layer_attention = layer_outputs[1]" in line)
    end = next(i for i in range(start, len(lines)) if "keep_indexs = keep_indexs.sort().values" in lines[i])
    return textwrap.dedent("\n".join(lines[start:end + 1]))


def record_fastv(root: str):
    block = fastv_block(official_source(root, os.path.join("FastV", FASTV_FILE)))
    out = []
    for kind, k, ratio in FASTV_CASES:
        model = tiny_llava_lm(kind, attn="eager")
        for b, sample in enumerate(samples(model, kind)):
            with torch.no_grad():
                attentions = model(**sample, output_attentions=True).attentions
            visual = (sample["input_ids"][0] == LLAVA_IMAGE_TOKEN).nonzero()[:, 0]
            scope = {"torch": torch, "layer_outputs": (None, attentions[k - 1]), "device": torch.device("cpu"),
                     "FASTV_image_token_start_index": int(visual[0]), "FASTV_image_token_length": len(visual),
                     "FASTV_r": ratio, "seq_length_with_past": sample["input_ids"].shape[1]}
            exec(block, scope)
            out.append(dict(kind=kind, layer=k, ratio=ratio, sample=b, input_checksum=checksum(sample),
                            keep_indexs=scope["keep_indexs"]))
    return out, fingerprint(tiny_llava_lm("llava")), fingerprint(tiny_llava_lm("next"))


def pdrop_function(source: str):
    """``pdrop_rank_drop`` and the module functions it calls, compiled from the official file."""
    tree = ast.parse(source)
    wanted = {"rotate_half", "apply_rotary_pos_emb"}
    scope = {"torch": torch, "nn": torch.nn, "math": __import__("math"), "IGNORE_INDEX": -100}
    from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask
    scope["_prepare_4d_causal_attention_mask"] = _prepare_4d_causal_attention_mask
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            exec(ast.get_source_segment(source, node), scope)
    method = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "pdrop_rank_drop")
    exec(textwrap.dedent(ast.get_source_segment(source, method, padded=True)), scope)
    return scope["pdrop_rank_drop"]


def official_self(model, layer: int, visual_start: int, visual: int, prompt: int, ratio: float):
    """The stand-in ``self`` the official method reads: config, the stage ratios and the layers."""
    lm = model.model.language_model
    positions = torch.arange(lm.config.max_position_embeddings)[None]
    cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), position_ids=positions)
    block = lm.layers[layer]
    attn = block.self_attn
    text = lm.config
    shim_attn = SimpleNamespace(num_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
                                head_dim=attn.head_dim, q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj,
                                rotary_emb=lambda value, seq_len: (cos[0], sin[0]))
    layers = {layer: SimpleNamespace(self_attn=shim_attn, input_layernorm=block.input_layernorm)}
    return SimpleNamespace(config=SimpleNamespace(tokenizer_padding_side="right", tokenizer_model_max_length=2048),
                           image_tokens=[visual], image_token_ratio_list=[1.0, ratio, ratio ** 2, ratio ** 3],
                           image_token_posi=[visual_start], prompt_len=[prompt], training=False, layers=layers)


def record_pdrop(root: str):
    rank_drop = pdrop_function(official_source(root, os.path.join("PyramidDrop", PDROP_FILE)))
    out = []
    for kind, ratio in PDROP_CASES:
        base = tiny_llava_lm(kind, kv_heads=4)
        for b, sample in enumerate(samples(base, kind)):
            model = copy.deepcopy(base)
            vitcompress.compress(model, "pyramiddrop", keep=ratio)
            layers = vitcompress.stats(model)["drop_layers"]
            entering = {}  # boundary -> (hidden states entering it, their positions): the previous layer's output

            def capture(module, args, kwargs, output, boundary, entering=entering):
                entering[boundary] = (output.detach(), kwargs["position_ids"].detach())

            handles = [model.model.language_model.layers[L - 1].register_forward_hook(
                lambda m, a, kw, o, L=L: capture(m, a, kw, o, L), with_kwargs=True) for L in layers]
            with torch.no_grad():
                model(**sample)
            for h in handles:
                h.remove()
            ids = sample["input_ids"][0]
            visual = int((ids == LLAVA_IMAGE_TOKEN).sum())
            start = int((ids == LLAVA_IMAGE_TOKEN).nonzero()[0, 0])
            kept = []
            for stage, layer in enumerate(layers):
                hidden, positions = entering[layer]
                shim = official_self(model, layer, start, visual, len(ids) - visual, ratio)
                with torch.no_grad():
                    _, _, new, _ = rank_drop(shim, cur_num=stage, rank_layer=layer, features=hidden,
                                             position_ids=positions, attention_mask=None, labels=None)
                rows = (new[0][:, None, :] == hidden[0][None, :, :]).all(-1).float().argmax(1)
                original = positions[0][rows]
                is_visual = (original >= start) & (original < start + visual)
                kept.append(original[is_visual])
            out.append(dict(kind=kind, ratio=ratio, layers=list(layers), sample=b, input_checksum=checksum(sample),
                            kept=kept))
    return out, fingerprint(tiny_llava_lm("llava", kv_heads=4)), fingerprint(tiny_llava_lm("next", kv_heads=4))


def dart_function(source: str):
    """The official ``get_retained_image_token`` (a method that reads only its arguments)."""
    tree = ast.parse(source)
    method = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_retained_image_token")
    scope = {"torch": torch, "math": __import__("math"), "LlamaConfig": object}
    exec(textwrap.dedent(ast.get_source_segment(source, method, padded=True)), scope)
    return scope["get_retained_image_token"]


def layer_keys(model, layer: int, sample):
    """Layer ``layer``'s keys ``[1, H, T, d]`` (rotary applied, heads repeated, as the official
    attention returns them) and its output through the final norm, in the uncompressed model."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
    lm = model.model.language_model
    attn = lm.layers[layer].self_attn
    seen = {}
    handles = [attn.register_forward_pre_hook(lambda m, a, kw: seen.update(pe=kw["position_embeddings"]),
                                              with_kwargs=True),
               attn.k_proj.register_forward_hook(lambda m, a, o: seen.update(k=o)),
               lm.layers[layer].register_forward_hook(lambda m, a, o: seen.update(out=o))]
    with torch.no_grad():
        model(**sample)
    for h in handles:
        h.remove()
    k = seen["k"].view(1, seen["k"].shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = seen["pe"]
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    with torch.no_grad():
        return repeat_kv(k, attn.num_key_value_groups), lm.norm(seen["out"])


def record_dart(root: str):
    retained = dart_function(official_source(root, os.path.join("DART", DART_FILE)))
    out = []
    for kind, k, ratio, max_kept, pivot_image, pivot_text in DART_CASES:
        model = tiny_llava_lm(kind)
        for b, sample in enumerate(samples(model, kind)):
            sample = with_question(sample)
            keys, states = layer_keys(model, k - 1, sample)
            ids = sample["input_ids"][0]
            visual = (ids == LLAVA_IMAGE_TOKEN).nonzero()[:, 0]
            config = SimpleNamespace(text_length=None, DART_config={
                "K": k, "image_token_start_index": int(visual[0]), "image_token_length": len(visual),
                "max_num_trunction": max_kept, "reduction_ratio": ratio, "pivot_image_token": pivot_image,
                "pivot_text_token": pivot_text})
            with torch.no_grad():
                kept = retained(None, config, states, keys)
            out.append(dict(kind=kind, layer=k, ratio=ratio, max_kept=max_kept, pivot_image=pivot_image,
                            pivot_text=pivot_text, sample=b, input_checksum=checksum(sample), kept=kept.sort().values))
    return out


def record(root: str, out: str) -> dict:
    fastv, fastv_llava, fastv_next = record_fastv(root)
    pdrop, pdrop_llava, pdrop_next = record_pdrop(root)
    data = {"commits": {"FastV": FASTV_COMMIT, "PyramidDrop": PDROP_COMMIT, "DART": DART_COMMIT}, "fastv": fastv,
            "pyramiddrop": pdrop, "dart": record_dart(root),
            "fingerprints": {("llava", 2): fastv_llava, ("next", 2): fastv_next, ("llava", 4): pdrop_llava,
                             ("next", 4): pdrop_next}}
    return official_repos.save(data, out)


def main(argv=None) -> int:
    parser = official_repos.arguments(__doc__, REPOS, DEFAULT_OUT, "not used (the cases are fixed)")
    args = parser.parse_args(argv)
    data = record(official_repos.official_root(args, REPOS), args.out)
    print(f"recorded {len(data['fastv'])} FastV, {len(data['pyramiddrop'])} PyramidDrop and {len(data['dart'])} DART "
          f"cases from FastV {FASTV_COMMIT[:8]}, PyramidDrop {PDROP_COMMIT[:8]}, DART {DART_COMMIT[:8]} into "
          f"{args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
