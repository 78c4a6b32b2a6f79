"""FLOPs counting (fvcore + our handlers) against known numbers and a hand computation."""
import torch

import vitcompress


def test_uncompressed_deit_small_is_the_well_known_4_6_gflops(deit_small):
    flops = vitcompress.count_flops(deit_small, torch.randn(1, 3, 224, 224))
    assert abs(flops / 4.6e9 - 1) < 0.01


def hand_flops_deit_small(tokens, method):
    """deit_small (C=384, 6 heads of 64, MLP 1536, 1000 classes) from the tokens entering each block."""
    C, d, hidden, classes = 384, 64, 1536, 1000
    total = 196 * C * 3 * 16 * 16 + C * classes  # patch embedding conv + head
    for n, m in zip(tokens, tokens[1:] + [None]):
        m = n if m is None else m  # the last block's output is measured below
        total += 5 * n * C + n * C * 3 * C + 2 * n * n * C + n * C * C  # norm1, qkv, attention, proj
        total += 5 * m * C + 2 * m * C * hidden  # norm2 + MLP on the reduced tokens
        r, t = n - m, n - 1
        if r and method == "tome":
            total += ((t + 1) // 2) * (t // 2) * d + r * (C + 1)  # A x B similarity + scatter-add
    return total + 5 * tokens[-1] * C  # final norm


def test_compressed_count_matches_a_hand_computation(deit_small):
    x = torch.randn(1, 3, 224, 224)
    vitcompress.compress(deit_small, "tome", r=[8] * 11)  # the last block keeps its tokens
    with torch.no_grad():
        deit_small(x)
    tokens = vitcompress.stats(deit_small)["tokens_per_layer"]
    counted = vitcompress.count_flops(deit_small, x)
    vitcompress.restore(deit_small)
    assert tokens == [197 - 8 * i for i in range(12)]
    assert counted == hand_flops_deit_small(tokens, "tome")


def test_planned_flops_equal_counted_flops(deit_small):
    x = torch.randn(1, 3, 224, 224)
    for method, budget in [("tome", {"r": 10}), ("pitome", {"keep": 0.85}), ("pitome", {"flops": 0.5})]:
        vitcompress.compress(deit_small, method, **budget)
        rt = deit_small._vitcompress
        planned = rt.adapter.cost().flops(rt.schedule, rt.method, rt.options)
        assert vitcompress.count_flops(deit_small, x) == planned, (method, budget)
    vitcompress.restore(deit_small)


def test_measure_speed_reports_throughput_latency_memory():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    out = vitcompress.measure_speed(model, torch.randn(4, 3, 8, 8), warmup=1, runs=3)
    assert out["throughput"] > 0 and out["latency_ms"] > 0 and out["batch_size"] == 4
    assert len(out["seconds"]) == 3 and isinstance(out["peak_memory"], int)
