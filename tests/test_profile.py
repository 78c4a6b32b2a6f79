"""FLOPs counting (fvcore + our handlers) against known numbers and a hand computation."""
import torch

import vitcompress
from vitcompress.testing import tiny_vit


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
    # Flatten is a view of the input, the Linear's output is the only tensor the forward makes
    assert out["peak_memory"] == 4 * 10 * 4


class Chain(torch.nn.Module):
    def forward(self, x):
        a = x * 2
        b = (a + 1).view(-1)  # a view: no new storage
        b.add_(1)  # in place: none either
        del a
        return (b * 3).view_as(x)


def test_cpu_peak_memory_follows_the_forwards_tensors():
    """Two tensors the size of the input are alive at once at the peak (a and b, then b and the
    output); views, in-place ops, the input and the weights add nothing."""
    from vitcompress.profile.speed import peak_memory
    x = torch.randn(64, 1024)
    assert peak_memory(Chain(), x) == 2 * x.nbytes



def test_a_compressed_block_frees_its_attention_tensors_before_the_mlp():
    """Without reduction a compressed model holds what the plain one does plus the token sizes;
    Zero-TPrune adds one block's attention probabilities, not one per block."""
    from vitcompress.profile.speed import peak_memory
    x = torch.randn(8, 3, 32, 32)
    plain = peak_memory(tiny_vit(), x)
    assert peak_memory(vitcompress.compress(tiny_vit(), "tome", r=0), x) == plain + 8 * 65 * 4
    probs = 8 * 3 * 65 * 65 * 4  # [B, H, N, N] float32 of the first block
    extra = peak_memory(vitcompress.compress(tiny_vit(), "zero_tprune", keep=0.9), x) - plain
    assert probs <= extra < 1.5 * probs
