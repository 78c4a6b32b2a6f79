#!/usr/bin/env python3
"""Re-apply the hand-written mutants of the InternVL adapter (issue 27) one at a time and say whether
tests/test_internvl.py (slow tests included) kills each; the file is restored after every run.

    python experiments/tools/internvl_mutants.py                 # all of them (~2 min on 2 CPU cores)
    python experiments/tools/internvl_mutants.py "thumbnail"     # those whose name contains a word

Each mutant: (name, file, line(s), replacement, the -k expression of the tests that should kill it[, their
test file when not tests/test_internvl.py]). Issue 28's (fastv / pyramiddrop / dart, visionzip / cdpruner on
InternVL) run tests/test_lm_prune_internvl.py and tests/test_visionzip_cdpruner_internvl.py.
"""
import os
import subprocess
import sys

os.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MUTANTS = [
    ("keys pooled by mean", "vitcompress/methods/tokencorr.py",
     "keys[:, cells].reshape(keys.shape[0], cells.shape[0], -1)", "keys[:, cells].mean(2)", "independently"),
    ("cells = contiguous groups of 4", "vitcompress/adapters/internvl.py",
     "self.cells = shuffled.reshape(-1, shuffled.shape[-1]).long()  # [T, G]",
     "self.cells = torch.arange(shuffled.numel()).reshape(-1, shuffled.shape[-1])", "independently"),
    ("thumbnail reduced (tokencorr)", "vitcompress/adapters/internvl.py",
     "            local = tiles - (tiles > 1)\n            layout", "            local = tiles\n            layout",
     "thumbnail or placeholders"),
    ("thumbnail dropped (quota)", "vitcompress/adapters/internvl.py",
     "f[:0], f[local * T:]))", "f[:0], f[:0]))", "placeholders"),
    ("taps before q/k norm", "vitcompress/adapters/internvl.py",
     "attn.q_norm.register_forward_hook", "attn.q_proj.register_forward_hook", "independently"),
    ("features joined as one entry", "vitcompress/adapters/internvl.py",
     "return torch.cat(units)[:, None]", "return torch.cat(units)[None]", "beam"),
    ("frames offset by local tiles", "vitcompress/adapters/internvl.py",
     "            first += tiles\n        return out", "            first += local\n        return out", "local_tiles"),
    ("images' runs reversed", "vitcompress/adapters/internvl.py",
     "        return [n // tokens_per_tile for n in runs]", "        return [n // tokens_per_tile for n in runs[::-1]]",
     "placeholders"),
    ("no InternVL layer default", "vitcompress/methods/tokencorr.py",
     '    family_defaults = {"internvl"', '    family_default_ = {"internvl"', "independently"),
    # issue 28
    ("language-model hooks not registered", "vitcompress/adapters/internvl.py",
     "            runtime.hook_language_model(patcher)", "            pass", "masked_model and fastv",
     "tests/test_lm_prune_internvl.py"),
    ("model switched to eager for fastv", "vitcompress/adapters/internvl.py",
     "            return LanguageModelRuntime(", "            return self.model.set_attn_implementation('eager') or "
     "LanguageModelRuntime(", "sdpa", "tests/test_lm_prune_internvl.py"),
    ("fastv scores the second-to-last token", "vitcompress/methods/fastv.py",
     "torch.where(valid, positions, -1).max(1).values", "torch.where(valid, positions, -1).max(1).values - 1",
     "selection", "tests/test_lm_prune_internvl.py"),
    ("pyramiddrop keeps the least attended", "vitcompress/methods/pyramiddrop.py",
     "        return top_visual(scores, signals.visual, counts)",
     "        return top_visual(-scores, signals.visual, counts)",
     "pyramiddrop_stages", "tests/test_lm_prune_internvl.py"),
    ("dart's states without the output norm", "vitcompress/adapters/internvl.py",
     "final_norm=lm.norm,", "final_norm=torch.nn.Identity(),", "dart_keeps", "tests/test_lm_prune_internvl.py"),
    ("<img> counted as a visual token", "vitcompress/adapters/internvl.py",
     "visual_token_ids=(self.config.image_token_id,)", "visual_token_ids=(self.config.image_token_id, 97)",
     "masked_model and fastv", "tests/test_lm_prune_internvl.py"),
    ("visionzip cells = contiguous groups of 4", "vitcompress/adapters/internvl.py",
     "self.cells = shuffled.reshape(-1, shuffled.shape[-1]).long()  # [T, G]",
     "self.cells = torch.arange(shuffled.numel()).reshape(-1, shuffled.shape[-1])", "visionzip_keeps",
     "tests/test_visionzip_cdpruner_internvl.py"),
    ("visionzip keys pooled by mean", "vitcompress/methods/tokencorr.py",
     "keys[:, cells].reshape(keys.shape[0], cells.shape[0], -1)", "keys[:, cells].mean(2)", "visionzip_keeps",
     "tests/test_visionzip_cdpruner_internvl.py"),
    ("no visionzip InternVL layer default", "vitcompress/methods/visionzip.py",
     '    family_defaults = {"internvl"', '    family_default_ = {"internvl"', "visionzip_keeps",
     "tests/test_visionzip_cdpruner_internvl.py"),
    ("visionzip contextual token = its target only", "vitcompress/methods/visionzip.py",
     "    return torch.cat([kept, context], dim=1), {",
     "    return torch.cat([kept, rest_hidden[:, targets]], dim=1), {",
     "visionzip_keeps", "tests/test_visionzip_cdpruner_internvl.py"),
    ("cdpruner relevance of another tile", "vitcompress/methods/cdpruner.py",
     "method.similarity(options, hidden, question)", "method.similarity(options, hidden.flip(0), question)",
     "cdpruner_keeps", "tests/test_visionzip_cdpruner_internvl.py"),
    ("cdpruner clip= accepted", "vitcompress/adapters/internvl.py",
     'and options.get("clip") is not None:', 'and options.get("clip") is False:', "refused",
     "tests/test_visionzip_cdpruner_internvl.py"),
]
selected = sys.argv[1:]
for name, path, old, new, tests, *test_file in MUTANTS:
    if selected and not any(word in name for word in selected):
        continue
    source = open(path).read()
    assert source.count(old) == 1, (name, source.count(old))
    open(path, "w").write(source.replace(old, new))
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", *(test_file or ["tests/test_internvl.py"]), "-q", "-x",
                              "-m", "slow or not slow", "-k", tests], capture_output=True, text=True, timeout=600)
    finally:
        open(path, "w").write(source)
    lines = run.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith("FAILED")]
    print(f"{'KILLED  ' if run.returncode else 'SURVIVED'} {name}: {failed[0] if failed else lines[-1]}", flush=True)
