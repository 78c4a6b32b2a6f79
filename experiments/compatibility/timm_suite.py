"""timm's own model tests on compressed models, as a standing compatibility check.

Fetches the source distribution of the installed timm from PyPI (pip, into a cache folder, reused when
there), takes its ``tests/test_models.py`` and runs it with pytest on ViT-family models: once on plain
timm, then once per static method applied to every model right after ``timm.create_model`` made it
(``timm_suite_plugin.py``, next to this script). Writes a markdown table: per timm test function and
method, how many passed, were refused with a documented one-line message, or failed. Exits 1 when a
test that passes on plain timm fails compressed other than by a documented refusal.

    python experiments/compatibility/timm_suite.py                       # the 18 models, every method
    python experiments/compatibility/timm_suite.py --models deit_tiny_patch16_224 --methods tome

The pytest runs see this checkout's ``vitcompress`` (a folder holding only a link to it comes first on
their PYTHONPATH) and nothing else of the repository.
"""
import argparse
import collections
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parents[1] / "vitcompress"

# ViT, DeiT, distilled DeiT, DeiT-III, EVA-02, BEiT / BEiTv2, DINOv3 (Eva), DINOv2 with registers, registers
# with average pooling (one with timm's parallel-scaling blocks), average pooling, the ResNet hybrid, timm's
# own test ViT: the smallest variant of each that timm's tests run.
MODELS = [
    "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224", "eva02_tiny_patch14_224", "beit_base_patch16_224", "beitv2_base_patch16_224",
    "vit_small_patch16_dinov3", "vit_tiny_patch16_dinov3_qkvb", "vit_small_patch14_reg4_dinov2",
    "vit_little_patch16_reg4_gap_256", "vit_wee_patch16_reg1_gap_256", "vit_pwee_patch16_reg1_gap_256",
    "vit_medium_patch16_gap_256", "vit_tiny_r_s16_p8_224", "test_vit", "test_vit3",
]
# The static methods (a schedule fixed before the forward), each with the budget it runs at.
METHODS = {"tome": {"r": 2}, "pitome": {"keep": 0.9}, "zero_tprune": {"flops": 0.8}}
PLAIN = "plain"


class SuiteUnavailable(RuntimeError):
    """timm's tests cannot be had: PyPI unreachable, or a source distribution without them."""


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitcompress" / "timm_suite"


def fetch_tests(version: str, cache: Path) -> Path:
    """The folder holding timm ``version``'s ``test_models.py`` (and conftest), extracted from its
    source distribution, which pip downloads from PyPI unless the cache has it."""
    tests = cache / f"timm-{version}-tests"
    if (tests / "test_models.py").is_file():
        return tests
    sdist = cache / f"timm-{version}.tar.gz"
    if not sdist.is_file():
        done = subprocess.run([sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-deps",
                               "--no-binary", ":all:", "--disable-pip-version-check", "-d", str(cache)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not sdist.is_file():
            raise SuiteUnavailable(f"pip could not download timm {version}'s source distribution from PyPI: "
                                   f"{(done.stderr.strip().splitlines() or ['no sdist saved'])[-1]}")
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).relative_to(f"timm-{version}").as_posix(): m for m in tar.getmembers()
                   if m.isfile() and m.name.startswith(f"timm-{version}/tests/")}
        if "tests/test_models.py" not in members:
            raise SuiteUnavailable(f"timm {version}'s source distribution has no tests/test_models.py")
        staging = Path(tempfile.mkdtemp(dir=cache))
        for name in ("tests/test_models.py", "tests/conftest.py"):
            if name in members:
                (staging / Path(name).name).write_bytes(tar.extractfile(members[name]).read())
    # the folder's own ini: pytest takes it (not the repository's) as rootdir and configuration
    (staging / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\nfilterwarnings =\n"
                                        "    ignore::pytest.PytestUnknownMarkWarning\n")
    staging.rename(tests)
    return tests


def import_path(cache: Path) -> str:
    """PYTHONPATH of the pytest runs: a folder with only a link to this checkout's vitcompress, then
    this script's folder (the plugin)."""
    linked = cache / "pythonpath"
    linked.mkdir(parents=True, exist_ok=True)
    link = linked / "vitcompress"
    if not (link.is_symlink() and link.resolve() == PACKAGE.resolve()):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(PACKAGE, target_is_directory=True)
    return os.pathsep.join([str(linked), str(HERE)])


def run_tests(tests: Path, pythonpath: str, method: str, models, functions, results: Path) -> dict:
    """One pytest run of timm's model tests (``method`` applied at creation, or plain): each test's record."""
    args = [sys.executable, "-m", "pytest", "test_models.py", "-q", "--tb=no", "-p", "timm_suite_plugin",
            "--vc-models", ",".join(models), "--vc-tests", ",".join(functions), "--vc-results", str(results)]
    if method != PLAIN:
        args += ["--vc-method", method, "--vc-options", json.dumps(METHODS[method])]
    env = dict(os.environ, PYTHONPATH=pythonpath)
    done = subprocess.run(args, cwd=tests, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1) or not results.is_file():  # 1: some test failed
        raise RuntimeError(f"pytest ({method}) exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(results.read_text())


def describe(method: str) -> str:
    return method if method == PLAIN else method + " " + " ".join(f"{k}={v}" for k, v in METHODS[method].items())


def counts(records) -> collections.Counter:
    return collections.Counter(r["outcome"] for r in records)


def summary(counted: collections.Counter) -> str:
    order = ("passed", "refused", "failed", "skipped")
    return ", ".join(f"{counted[o]} {o}" for o in order if counted[o]) or "-"


def unexpected(plain: dict, runs: dict) -> dict:
    """method -> the records of tests that pass on plain timm and fail compressed (not a refusal)."""
    return {method: {node: r for node, r in records.items()
                     if r["outcome"] == "failed" and plain.get(node, {}).get("outcome") == "passed"}
            for method, records in runs.items()}


def table(version: str, models, plain: dict, runs: dict) -> str:
    """The markdown report: per test function x method, then refusals, then failures."""
    methods = list(runs)
    functions = sorted({r["test"] for r in plain.values()} | {r["test"] for rs in runs.values() for r in rs.values()})
    lines = [f"# timm {version}'s model tests on compressed models", "",
             f"`tests/test_models.py` of timm {version}'s source distribution on {len(models)} models "
             f"({', '.join(models)}); each method applied right after `timm.create_model`. "
             "Refused: a documented refusal, recognised by its one-line message.", "",
             "| timm test | " + " | ".join([PLAIN] + [describe(m) for m in methods]) + " |",
             "|---" * (len(methods) + 2) + "|"]
    for function in functions:
        cells = [summary(counts(r for r in plain.values() if r["test"] == function))]
        cells += [summary(counts(r for r in runs[m].values() if r["test"] == function)) for m in methods]
        lines.append(f"| `{function}` | " + " | ".join(cells) + " |")
    cells = [summary(counts(plain.values()))] + [summary(counts(runs[m].values())) for m in methods]
    lines += ["| **all** | " + " | ".join(f"**{c}**" for c in cells) + " |", ""]

    passing = {node for node, r in plain.items() if r["outcome"] == "passed"}
    lines += ["Of the tests that pass on plain timm:", "",
              "| method | passed | refused | failed |", "|---|---|---|---|"]
    bad = unexpected(plain, runs)
    for m in methods:
        c = counts(r for node, r in runs[m].items() if node in passing)
        lines.append(f"| {describe(m)} | {c['passed']} | {c['refused']} | {c['failed']} |")

    refusals = sorted({r["refusal"] for rs in runs.values() for r in rs.values() if r["outcome"] == "refused"})
    if refusals:
        lines += ["", "Refusals:", "", "| refusal | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for name in refusals:
            per = [sum(r.get("refusal") == name for r in runs[m].values()) for m in methods]
            lines.append(f"| {name} | " + " | ".join(map(str, per)) + " |")

    lines += ["", "Failures of tests that pass on plain timm:" if any(bad.values()) else
              "No test that passes on plain timm fails compressed other than by a documented refusal."]
    for m in methods:
        by_message = collections.defaultdict(list)
        for node, r in sorted(bad[m].items()):
            by_message[r["message"]].append(node.split("::")[-1])
        for message, nodes in by_message.items():
            lines.append(f"- {describe(m)}, {len(nodes)}: `{message[:300]}` ({', '.join(nodes)})")
    plain_failed = sorted(node.split("::")[-1] for node, r in plain.items() if r["outcome"] == "failed")
    if plain_failed:
        lines += ["", f"Failing on plain timm too (not counted): {', '.join(plain_failed)}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    version = importlib.metadata.version("timm")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods, of: " + ", ".join(describe(m) for m in METHODS))
    parser.add_argument("--tests", default="", help="comma-separated timm test functions (default: every one "
                                                    "that takes a model name)")
    parser.add_argument("--out", default=str(HERE.parent / "results" / f"timm_suite_{version}.md"),
                        help="the markdown table (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="pytest runs at once (default: %(default)s)")
    parser.add_argument("--cache", default=str(default_cache()),
                        help="where timm's source distribution and tests are kept (default: %(default)s)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not among {', '.join(METHODS)}")
    functions = [f for f in args.tests.split(",") if f]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        tests = fetch_tests(version, cache)
    except SuiteUnavailable as err:
        print(f"timm_suite: {err}", file=sys.stderr)
        return 2
    pythonpath = import_path(cache)
    runs = [PLAIN] + methods
    records = {}
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        def run(method):
            start = time.perf_counter()
            done = run_tests(tests, pythonpath, method, models, functions, Path(scratch) / f"{method}.json")
            print(f"timm_suite: [{runs.index(method) + 1}/{len(runs)}] {describe(method)}: "
                  f"{summary(counts(done.values()))} ({time.perf_counter() - start:.0f} s)", flush=True)
            return done
        for method, done in zip(runs, pool.map(run, runs)):
            records[method] = done
    plain = records.pop(PLAIN)
    if not plain:
        print(f"timm_suite: no test of timm {version}'s test_models.py takes any of {', '.join(models)}",
              file=sys.stderr)
        return 2
    report = table(version, models, plain, records)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    failed = sum(len(r) for r in unexpected(plain, records).values())
    print(f"timm_suite: table in {args.out}; {failed} unexpected failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
