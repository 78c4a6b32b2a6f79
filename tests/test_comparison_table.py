"""The comparison table of every ViT method (``experiments/studies/fidelity_table.py``): its method set,
random pruning at each method's own schedule, the reference-model section and the speed column
(the last two run models: slow, ``python -m pytest -m slow tests/test_comparison_table.py``)."""
import pytest

import vitcompress
from conftest import load_script
from vitcompress.methods import REGISTRY


@pytest.fixture(scope="module")
def table():
    """The script, loaded here rather than at collection: it registers its comparison methods
    (random_prune, rank_prune), which other test files must not see; they leave with it."""
    before = set(REGISTRY)
    yield load_script("studies/fidelity_table.py")
    for name in set(REGISTRY) - before:
        del REGISTRY[name]


@pytest.fixture
def args(table):
    return lambda *argv: table.parse_args(list(argv))


def test_every_registered_vit_method_by_default_and_unknown_names_refused(args):
    assert args().methods == [m for m in vitcompress.list_methods("vit") if m not in ("random_prune", "rank_prune")]
    assert "tofu" in args().methods and "random_prune" not in args().methods
    assert args("--methods", "tofu", "tome").methods == ["tofu", "tome"]
    with pytest.raises(SystemExit):
        args("--methods", "tome", "focus_detr")  # a detection method is not a ViT method


@pytest.mark.slow  # 20-45 s on a loaded 2-core CPU
def test_reference_section_has_random_pruning_at_each_methods_schedule(table, args):
    a = args("--methods", "tome", "zero_tprune", "--flops", "0.6", "--seeds", "2", "--reference-images", "200")
    result = table.reference_table(a)
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["uncompressed", "tome", "random @ tome schedule (2 seeds)",
                                           "zero_tprune", "random @ zero_tprune schedule (2 seeds)"]
    assert rows[0]["agreement"] == 1.0 and rows[0]["schedule"] == []
    for method, rnd in (rows[1], rows[2]), (rows[3], rows[4]):
        assert rnd["schedule"] == method["schedule"] and sum(method["schedule"]) > 0
        assert rnd["top1_min"] <= rnd["top1"] <= rnd["top1_max"]
        assert 0 < method["agreement"] < 1 and 0 < rnd["agreement"] < 1
    assert len(result["markdown"].splitlines()) == 2 + len(rows)


@pytest.mark.slow
def test_speed_compares_each_method_and_random_pruning_at_its_deit_schedule(table, args):
    a = args("--methods", "tome", "--flops", "0.55", "--speed-runs", "1", "--speed-batch", "1")
    speed = table.run_speed(a)
    assert set(speed["speedup"]) == {"uncompressed", ("tome", 0.55), ("random @ tome", 0.55)}
    assert speed["speedup"]["uncompressed"] == 1.0
    assert len(speed["schedules"]["('tome', 0.55)"]) == 12
    assert "deit_small_patch16_224" in speed["caption"] and "load average" in speed["caption"]
    assert "batch 1" in speed["caption"] and "threads" in speed["caption"]


def test_table_has_a_speedup_column_when_measured(table):
    row = {"macs": 0.7, "block_macs": 0.69, "tokens": [257, 240], "schedule": [17, 16], "photos_1-cos": 0.01,
           "method": "tome", "flops": 0.7}
    text = table.table([dict(row, speedup=1.3)], ["photos"], lambda r: r["method"])
    assert text.splitlines()[0].endswith("| DeiT-S speedup |") and text.splitlines()[2].endswith("| 1.30x |")
    assert "speedup" not in table.table([row], ["photos"], lambda r: r["method"])
