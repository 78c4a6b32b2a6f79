#!/usr/bin/env python3
"""Mutation check of the algorithm modules: mutmut's mutants, run one at a time against the fast
default-run tests that cover each module.

    pip install "mutmut<3"
    python experiments/tools/mutation.py methods/tome.py                   # one module (under vitcompress/)
    python experiments/tools/mutation.py --budget 1500 engine/schedule.py  # stop after 1500 s (reports what ran)
    python experiments/tools/mutation.py --all --json out.json             # every module of TESTS
    python experiments/tools/mutation.py --lines 40-95 methods/quota.py    # the mutants of those lines only

The mutants are mutmut 2.x's (``mutmut.list_mutations`` / ``mutmut.mutate``: operators, numbers,
keywords, names, arguments, ...); mutants that only change the text of a string (error messages,
docstrings) are not run. Each mutant is written over the module, the module's tests run with
``-x`` (``-m "not slow"`` from pytest.ini: the slow paths stay out), and the module is restored --
also when the run is stopped (Ctrl-C, SIGTERM, ``--budget``). A mutant is killed when the tests
fail or time out (5x the unmutated run, at least 60 s). The driver does not use ``mutmut run``:
mutmut 2.5's run loop died in its result cache ("Attribute Mutant.line is required") on these
modules. The Triton kernels (``kernels/*_triton.py``) are not mutated: their tests need the
interpreter (docs/contributing.md).

Prints, per module, killed / total and each survivor (line, original, mutant).
"""
import argparse
import json
import os
import shlex
import signal
import sys
import time

sys.dont_write_bytecode = True
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the checks every method's descriptor takes part in (its option help, default budget, keep= meaning)
_EVERY_METHOD = "describe_lists or default_budget_is_one or keep_means"

#: module (under vitcompress/) -> the fast default-run tests that cover it, cheapest first (pytest
#: arguments, split as a shell would: ``-k 'a or b'`` narrows a file to the tests of the module)
TESTS = {
    "methods/tome.py": "tests/test_methods.py tests/test_algorithm_checks.py tests/test_official_recorded.py "
                       "tests/test_errors.py tests/test_profile.py",
    "methods/pitome.py": "tests/test_methods.py tests/test_algorithm_checks.py tests/test_official_recorded.py "
                         "tests/test_errors.py tests/test_profile.py",
    "engine/schedule.py": "tests/test_errors.py tests/test_algorithm_checks.py tests/test_official_recorded.py "
                          "tests/test_support.py tests/test_profile.py",
    "kernels/reference.py": "tests/test_method_mutants.py tests/test_methods.py tests/test_algorithm_checks.py "
                            "tests/test_official_recorded.py tests/test_zero_tprune.py",
    "methods/zero_tprune.py": "tests/test_zero_tprune.py tests/test_algorithm_checks.py "
                              "-k 'zero or tprune or pagerank'",
    "methods/focus_detr.py": "tests/test_method_mutants.py tests/test_algorithm_checks.py tests/test_detr.py "
                             "-k 'focus or cascade or padding or dual' "
                             "--deselect tests/test_detr.py::test_scorer_training_loss_falls_and_eval_coco_runs",
    "methods/tokencorr.py": "tests/test_method_mutants.py tests/test_llava.py tests/test_internvl.py "
                            "tests/test_qwen_vl.py -k 'tokencorr or crop or sampling or merge'",
    "methods/quota.py": "tests/test_method_mutants.py tests/test_llava.py -k 'quota or grid or frame'",
    "engine/tokens.py": "tests/test_methods.py tests/test_algorithm_checks.py tests/test_official_recorded.py",
    "engine/blocks.py": "tests/test_methods.py tests/test_algorithm_checks.py tests/test_official_recorded.py "
                        "tests/test_timm_adapter.py",
    "profile/flops.py": "tests/test_profile.py",
    "methods/evit.py": "tests/test_evit.py tests/test_official_evit_mctf.py tests/test_method_mutants.py "
                       "tests/test_errors.py -k 'evit or layers or " + _EVERY_METHOD + "'",
    "methods/mctf.py": "tests/test_mctf.py tests/test_official_evit_mctf.py tests/test_method_mutants.py "
                       "tests/test_errors.py -k 'mctf or layers or " + _EVERY_METHOD + "'",
    "methods/tofu.py": "tests/test_tofu.py tests/test_method_mutants.py tests/test_errors.py "
                       "-k 'tofu or " + _EVERY_METHOD + "'",
    "methods/ppt.py": "tests/test_ppt.py tests/test_official_ppt_atc.py tests/test_method_mutants.py "
                      "tests/test_errors.py -k 'ppt or layers or " + _EVERY_METHOD + "'",
    "methods/atc.py": "tests/test_atc.py tests/test_official_ppt_atc.py tests/test_method_mutants.py "
                      "tests/test_errors.py -k 'atc or layers or " + _EVERY_METHOD + "'",
    "methods/random_prune.py": "tests/test_method_mutants.py tests/test_tune.py tests/test_errors.py "
                               "-k 'random or " + _EVERY_METHOD + "'",
    "methods/block_options.py": "tests/test_method_mutants.py tests/test_evit.py tests/test_ppt.py -k layers",
    "methods/fastv.py": "tests/test_official_lm_recorded.py tests/test_fastv.py tests/test_lm_prune.py "
                        "tests/test_lm_prune_qwen.py tests/test_lm_prune_internvl.py "
                        "tests/test_vlm_method_mutants.py tests/test_errors.py "
                        "-k 'fastv and not generate and not keep_all or options_are_checked or describe_lists'",
    "methods/pyramiddrop.py": "tests/test_official_lm_recorded.py tests/test_pyramiddrop.py tests/test_lm_prune.py "
                              "tests/test_lm_prune_qwen.py tests/test_lm_prune_internvl.py "
                              "tests/test_vlm_method_mutants.py tests/test_errors.py "
                              "-k 'pyramiddrop and not generate and not keep_all and not (lambda and next) "
                              "or layers_must_fit or options_are_checked or describe_lists'",
    "methods/dart.py": "tests/test_dart.py::test_least_duplicates_takes_the_least_similar_remaining_tokens "
                       "tests/test_official_lm_recorded.py tests/test_dart.py tests/test_lm_prune.py tests/test_lm_prune_qwen.py "
                       "tests/test_lm_prune_internvl.py "
                       "tests/test_vlm_method_mutants.py tests/test_errors.py "
                       "-k 'dart and not generate and not keep_all or options_are_checked or describe_lists'",
    "methods/visionzip.py": "tests/test_visionzip_cdpruner.py::"
                            "test_visionzip_contextual_tokens_are_target_plus_mean_of_the_joined "
                            "tests/test_visionzip_cdpruner.py::"
                            "test_visionzip_dominant_tokens_are_the_cls_attention_top "
                            "tests/test_official_visionzip_cdpruner.py tests/test_visionzip_cdpruner.py "
                            "tests/test_official_qwen_visionzip_cdpruner.py tests/test_qwen_visionzip_cdpruner.py "
                            "tests/test_onevision_visionzip_cdpruner.py tests/test_visionzip_cdpruner_internvl.py "
                            "tests/test_vlm_method_mutants.py tests/test_errors.py "
                            "-k 'visionzip_keeps or visionzip_contextual or visionzip_dominant or visionzip] "
                            "or visionzip- or paper_splits or describe_lists or (vlm_method and visionzip) "
                            "or (visionzip and (qwen or onevision or internvl))'",
    "methods/cdpruner.py": "tests/test_visionzip_cdpruner.py::"
                           "test_relevance_is_the_negated_mean_min_max_normalised "
                           "tests/test_visionzip_cdpruner.py::test_greedy_map_maximises_the_determinant_step_by_step "
                           "tests/test_official_visionzip_cdpruner.py tests/test_visionzip_cdpruner.py "
                           "tests/test_official_qwen_visionzip_cdpruner.py tests/test_qwen_visionzip_cdpruner.py "
                           "tests/test_onevision_visionzip_cdpruner.py tests/test_visionzip_cdpruner_internvl.py "
                           "tests/test_vlm_method_mutants.py tests/test_errors.py "
                           "-k '(cdpruner and (qwen or onevision or internvl)) or cdpruner_keeps or cdpruner_on_next or cdpruner] or cdpruner- or cdpruner_selection "
                           "or cdpruner_scorer or relevance or greedy_map or cdpruner_needs or describe_lists "
                           "or (vlm_method and cdpruner)'",
    "methods/__init__.py": "tests/test_vlm_method_mutants.py tests/test_errors.py -k 'registry or unknown or "
                           "describe_reports'",
}


def mutants(source: str, path: str):
    """``(mutation_id, mutated source)`` for every mutmut mutant of ``source`` that changes code."""
    from mutmut import ALL, Context, list_mutations, mutate

    for mid in list_mutations(Context(source=source, mutation_id=ALL, filename=path)):
        mutated, _ = mutate(Context(source=source, mutation_id=mid, filename=path))
        if not _string_only(source, mutated):
            yield mid, mutated


def _string_only(before: str, after: str) -> bool:
    """Whether the change is mutmut's ``XX...XX`` inside a string literal and nothing else."""
    old, new = before.splitlines(), after.splitlines()
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    return len(old) == len(new) and len(changed) == 1 and changed[0][1].replace("XX", "") == changed[0][0].replace("XX", "")


def _diff(before: str, after: str):
    for i, (a, b) in enumerate(zip(before.splitlines(), after.splitlines()), start=1):
        if a != b:
            return i, a.strip(), b.strip()
    return 0, "", ""


_PRELOADED = False


def _preload() -> None:
    """Import the heavy libraries once in this process (never vitcompress: each forked test run
    imports the module under test afresh)."""
    global _PRELOADED
    if not _PRELOADED:
        import numpy  # noqa: F401
        import pytest  # noqa: F401
        import timm  # noqa: F401
        import torch  # noqa: F401
        try:
            import transformers  # noqa: F401
        except ImportError:
            pass
        assert not any(m == "vitcompress" or m.startswith("vitcompress.") for m in sys.modules)
        _PRELOADED = True


def run_tests(tests: str, timeout: float) -> (bool, float):
    """``(passed, seconds)`` of the tests (``-x -q``) in a forked child of this process (the heavy
    imports done once); a timeout counts as a failure. No bytecode is written, so a mutant of the
    same size written within the same second can never be read from a stale ``.pyc``."""
    _preload()
    start = time.time()
    pid = os.fork()
    if pid == 0:  # the child: run pytest here and leave without cleanup
        code = 3
        try:
            os.chdir(ROOT)
            sys.path.insert(0, ROOT)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import pytest
            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *shlex.split(tests)]))
        finally:
            os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0, time.time() - start
        if time.time() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False, time.time() - start
        time.sleep(0.05)


def in_lines(line: int, spans) -> bool:
    """Whether ``line`` is in one of the ``(first, last)`` spans (no spans: every line)."""
    return not spans or any(first <= line <= last for first, last in spans)


def check_module(module: str, deadline: float, tests=None, spans=()) -> dict:
    path = os.path.join(ROOT, "vitcompress", module)
    tests = tests or TESTS[module]
    with open(path) as f:
        original = f.read()
    cache = os.path.join(os.path.dirname(path), "__pycache__")
    stem = os.path.splitext(os.path.basename(path))[0] + "."
    for name in os.listdir(cache) if os.path.isdir(cache) else []:
        if name.startswith(stem):
            os.remove(os.path.join(cache, name))  # the tests read the source, never an old .pyc
    ok, base = run_tests(tests, timeout=1800)
    if not ok:
        raise SystemExit(f"{module}: the tests fail without a mutant ({tests}); fix them first")
    result = dict(module=module, tests=tests, killed=0, total=0, survivors=[], not_run=0)

    def restore(*_):
        with open(path, "w") as f:
            f.write(original)
        if _:
            raise SystemExit(130)

    signal.signal(signal.SIGTERM, restore)
    all_mutants = [(mid, m) for mid, m in mutants(original, path) if in_lines(_diff(original, m)[0], spans)]
    try:
        for n, (mid, mutated) in enumerate(all_mutants):
            if time.time() > deadline:
                result["not_run"] = len(all_mutants) - n
                break
            with open(path, "w") as f:
                f.write(mutated)
            passed, _ = run_tests(tests, timeout=max(60.0, 5 * base))
            restore()
            result["total"] += 1
            line, before, after = _diff(original, mutated)
            if passed:
                result["survivors"].append(dict(line=line, original=before, mutant=after))
                print(f"  SURVIVED line {line}: {before}  ->  {after}", flush=True)
            else:
                result["killed"] += 1
    finally:
        restore()
    print(f"{module}: killed {result['killed']} / {result['total']}"
          + (f" ({result['not_run']} not run: out of time)" if result["not_run"] else ""), flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="paths under vitcompress/, e.g. methods/tome.py")
    ap.add_argument("--all", action="store_true", help="every module of the TESTS table")
    ap.add_argument("--tests", help="the tests to run instead of the table's (one module)")
    ap.add_argument("--budget", type=float, default=0, help="stop starting mutants after this many seconds")
    ap.add_argument("--lines", help="only the mutants of these lines, e.g. 40-95,120-130 (one module)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    modules = list(TESTS) if args.all else args.modules
    if not modules:
        ap.error("name modules (e.g. methods/tome.py) or --all")
    for m in modules:
        if m not in TESTS and not args.tests:
            ap.error(f"{m}: not in the TESTS table of {__file__}; give --tests")
    spans = [tuple(int(x) for x in part.split("-")) if "-" in part else (int(part), int(part))
             for part in args.lines.split(",")] if args.lines else []
    deadline = time.time() + args.budget if args.budget else float("inf")
    results = []
    for m in modules:
        print(f"== {m}", flush=True)
        results.append(check_module(m, deadline, args.tests, spans))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
