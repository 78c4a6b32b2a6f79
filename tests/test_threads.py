"""One compressed model, many threads: each forward keeps its own token state (inference servers
call one model from a thread pool)."""
import threading

import pytest
import torch

import vitcompress
from vitcompress.testing import tiny_vit

THREADS, CALLS = 8, 20


def run_concurrently(model, inputs, call):
    """Every thread runs ``call(model, its input)`` CALLS times; returns per thread the outputs and
    the tokens per layer that ``stats`` reported right after each call."""
    results = [None] * len(inputs)
    errors = []
    start = threading.Barrier(len(inputs))

    def work(i):
        try:
            start.wait()
            outs = []
            for _ in range(CALLS):
                out = call(model, inputs[i])
                outs.append((out, vitcompress.stats(model)["tokens_per_layer"]))
            results[i] = outs
        except Exception as err:  # reported below, with the thread's index
            errors.append((i, err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def check_against_sequential(model, inputs, call):
    expected = []
    for x in inputs:
        out = call(model, x)
        expected.append((out, vitcompress.stats(model)["tokens_per_layer"]))
    for i, runs in enumerate(run_concurrently(model, inputs, call)):
        for out, tokens in runs:
            assert torch.equal(out, expected[i][0]), f"thread {i} got another output"
            assert tokens == expected[i][1], f"thread {i} saw the token counts of another forward"


def forward(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("method,budget", [("tome", dict(r=4)), ("pitome", dict(keep=0.8)),
                                           ("zero_tprune", dict(keep=0.8))])
def test_timm_vit_threads_get_their_own_outputs(method, budget):
    # Batches of different sizes and images of different sizes (dynamic_img_size: another schedule).
    model = tiny_vit(dynamic_img_size=True, global_pool="avg")
    vitcompress.compress(model, method, **budget)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1 + i % 3, 3, 32 if i % 2 else 24, 32, generator=g) for i in range(THREADS)]
    check_against_sequential(model, inputs, forward)


def test_forward_features_then_forward_head_pools_with_this_threads_sizes():
    model = tiny_vit(global_pool="avg")
    vitcompress.compress(model, "tome", r=4)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(THREADS)]

    def two_step(m, x):
        with torch.no_grad():
            return m.forward_head(m.forward_features(x))

    check_against_sequential(model, inputs, two_step)


def test_open_clip_tower_threads():
    pytest.importorskip("open_clip")
    from vitcompress.testing import OPEN_CLIP_VARIANTS, tiny_clip

    model = tiny_clip(**OPEN_CLIP_VARIANTS["attn_pool"])
    vitcompress.compress(model, "pitome", keep=0.8)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(1 + i % 2, 3, 32, 32, generator=g) for i in range(THREADS)]

    def encode(m, x):
        with torch.no_grad():
            return m.encode_image(x)

    check_against_sequential(model, inputs, encode)


def test_hf_clip_tower_threads():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
        patch_size=4)).eval()
    vitcompress.compress(model, "zero_tprune", keep=0.8)
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1 + i % 2, 3, 32, 32, generator=g) for i in range(THREADS)]

    def pooled(m, x):
        with torch.no_grad():
            return m(pixel_values=x).last_hidden_state

    check_against_sequential(model, inputs, pooled)


def test_stats_before_any_forward_in_this_thread():
    model = tiny_vit()
    vitcompress.compress(model, "tome", r=2)
    forward(model, torch.randn(1, 3, 32, 32))
    seen = {}

    def other():
        seen.update(vitcompress.stats(model))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["tokens_per_layer"] == [] and "size" not in seen
    assert seen["planned_tokens_per_layer"] == vitcompress.stats(model)["planned_tokens_per_layer"]
