"""Prefill FLOPs, CPU latency and peak memory of every VLM method at the paper's budgets, against the
uncompressed model measured in the same run.

    python experiments/benchmarks/bench_vlm.py                       # LLaVA-1.5 and Qwen2.5-VL, 0.5B / 3B widths
    python experiments/benchmarks/bench_vlm.py --families llava --runs 9 --json rows.json
    python experiments/benchmarks/bench_vlm.py --quick               # tiny widths, seconds (the test's run)

Models: random weights (the speed of a model does not depend on its weights), built offline from configs
with the layer widths of the smallest released models and few layers (``--lm-layers``, ``--tower-layers``):
LLaVA-1.5 with a CLIP-L/336 tower (576 visual tokens) and a Qwen2-0.5B language model, and Qwen2.5-VL-3B.
The header prints every config. Inputs: one prompt (batch 1) per scenario, an image half flat and half
noise (a flat region has duplicate patches for content-dependent methods); Qwen2.5-VL also gets a video
scenario, where QuoTA reduces frame groups. A prefill is one forward on the prompt with the KV cache on
and logits for the last position only (what ``generate`` runs before its first new token).

Every method whose ``target`` is a VLM runs on every family where ``vitcompress.supported`` says True, at
the paper's budgets (:data:`PAPER_SETTINGS`; a method not listed there at its defaults); a refusal, a
failure, or a method that reduces nothing of a scenario's input is one printed line.

* **FLOPs**: multiply-adds of one prefill (fvcore's convention, as ``vitcompress.profile.count_flops``),
  counted by ``torch.utils.flop_counter.FlopCounterMode`` on every matrix product, convolution and fused
  attention call (the CPU SDPA kernel added: q k^T and p v over the full square), so the methods' own
  scoring (attention rows, DPP kernels, CLIP text tower) is included; elementwise ops and norms are not.
  fvcore's tracer cannot follow a VLM forward that rewrites its prompt. For a decoder layer on ``n`` tokens
  (hidden ``C``, ``H`` query and ``G`` key/value heads of width ``d``, MLP width ``I``) the count is
  ``n C (2 H d + 2 G d) + 2 H n^2 d + 3 n C I`` (tested against :func:`decoder_layer_flops`).
* **Latency**: the prefill's wall time, all settings of a scenario timed interleaved (each round times
  every setting once, rotating who goes first) after ``--warmup`` rounds; median and quartiles of ``--runs``.
* **Peak memory**: the peak bytes of the tensors the prefill allocates and holds at once (weights and
  inputs excluded, the KV cache included), followed tensor by tensor
  (``vitcompress.profile.speed.peak_tensor_memory``): exact and repeatable on a CPU, where the allocator
  keeps no statistics and the process's resident size never shrinks; buffers a kernel uses inside
  (SDPA's workspace) are not seen.

Ratios are to the uncompressed model of the same scenario; ``ideal`` is the speedup the FLOPs ratio implies
and ``of ideal`` the measured speedup over it. Timings on a loaded machine are not valid: the header gives
the load at the start and end and warns when the machine was busy.
"""
import argparse
import copy
import itertools
import json
import math
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import vitcompress
from vitcompress.methods import REGISTRY
from vitcompress.profile.conditions import busy_warning, describe_conditions, timing_conditions
from vitcompress.profile.speed import peak_tensor_memory

#: the settings each paper reports on LLaVA-1.5 (its 576 visual tokens)
PAPER_SETTINGS = {
    "fastv": [dict(keep=0.5, layer=2)],  # K=2, R=50%
    "pyramiddrop": [{}],  # lambda=0.5 at D/4, D/2, 3D/4
    "visionzip": [dict(dominant=54, contextual=10), dict(dominant=108, contextual=20),
                  dict(dominant=162, contextual=30)],  # 64 / 128 / 192 tokens
    "dart": [{}],  # the official LLaVA-1.5 setting: 128 of 576 tokens after layer 2
    "cdpruner": [dict(tokens=64), dict(tokens=128), dict(tokens=192)],
    "tokencorr": [{}],
    "quota": [dict(keep=0.5)],
}
QUESTION = "What is the object in the middle of the picture?"


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (two per multiply-add, FlopCounterMode's unit) of fused attention: q k^T and p v."""
    *batch, queries, width = query_shape
    return 2 * math.prod(batch) * queries * key_shape[-2] * (width + value_shape[-1])


#: FlopCounterMode counts CUDA's fused attention kernels, not the CPU one
SDPA_ON_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops}


# --------------------------------------------------------------------------- models and inputs


def llava_configs(quick, lm_layers, tower_layers):
    """LLaVA-1.5: CLIP-L/336 tower (24 x 24 patches of 14 px), 2-layer GELU projector, Qwen2-0.5B language
    model; ``quick``: the same shapes of tokens at tiny widths (24 x 24 patches of 4 px)."""
    from transformers import CLIPTextConfig, CLIPVisionConfig, LlavaConfig, Qwen2Config

    if quick:
        vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=96, patch_size=4,
                      projection_dim=16)
        text = dict(hidden_size=256, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                    vocab_size=256)  # 256 wide: CDPruner's kernel has the rank for 192 tokens
        clip_text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=100,
                         max_position_embeddings=16)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14,
                      projection_dim=768)
        text = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                    vocab_size=151936, rope_theta=1000000.0)
        clip_text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, vocab_size=49408,
                         max_position_embeddings=77)
    image_token = text["vocab_size"] - 3
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision, num_hidden_layers=tower_layers),
                         text_config=Qwen2Config(**text, num_hidden_layers=lm_layers, tie_word_embeddings=True),
                         image_token_index=image_token, vision_feature_layer=-2, tie_word_embeddings=True)
    clip_text = CLIPTextConfig(**clip_text, num_hidden_layers=tower_layers, bos_token_id=clip_text["vocab_size"] - 2,
                               eos_token_id=clip_text["vocab_size"] - 1, pad_token_id=0)
    return config, clip_text


def qwen25_config(quick, lm_layers, tower_layers):
    """Qwen2.5-VL-3B: windowed vision tower (1280 wide, the last layer global), 2048-wide language model."""
    from transformers import Qwen2_5_VLConfig

    if quick:
        vision = dict(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    vocab_size=256, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                         mrope_section=[2, 3, 3]))
    else:
        vision = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048)
        text = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                    head_dim=128, vocab_size=151936, rope_parameters=dict(rope_type="default", rope_theta=1000000.0,
                                                                         mrope_section=[16, 24, 24]))
    vocab = text["vocab_size"]
    return Qwen2_5_VLConfig(
        vision_config=dict(vision, depth=tower_layers, patch_size=14, window_size=112,
                           fullatt_block_indexes=[tower_layers - 1]),
        text_config=dict(text, num_hidden_layers=lm_layers, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4, tie_word_embeddings=True)


def half_flat_image(size, seed):
    """``[3, size, size]`` in [0, 1]: a flat left half, noise on the right."""
    image = torch.full((3, size, size), 0.5)
    image[:, :, size // 2:] = torch.rand(3, size, size - size // 2, generator=torch.Generator().manual_seed(seed))
    return image


def text_ids(count, vocab, seed):
    """``count`` token ids of ordinary text (none of the special ids at the end of the vocabulary)."""
    return torch.randint(10, min(vocab - 10, 30000), (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def prompt(before, visual, after):
    ids = torch.tensor([before + visual + after])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


class CharTokenizer:
    """A stand-in CLIP tokenizer (BOS, one id per character, EOS) for CDPruner's ``clip=``: the hub's
    tokenizer is not reachable offline, and the text tower's cost depends only on the token count."""

    def __init__(self, config):
        self.bos, self.eos = config.bos_token_id, config.eos_token_id

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([[self.bos] + [2 + ord(ch) % 90 for ch in t] + [self.eos] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def ramp_scorer(frames, question):
    """QuoTA's frame relevance, a stand-in for the paper's LVLM scorer (whose FLOPs are not counted here)."""
    return torch.linspace(0.1, 1.0, frames.shape[0])


def text_similarity(patches, question):
    """CDPruner's relevance on a tower without a CLIP text tower: a stand-in (patches' cosine to a fixed
    direction) whose cost, one product per patch, is counted; a real scorer embeds the question."""
    direction = torch.ones(patches.shape[-1], dtype=patches.dtype, device=patches.device)
    return torch.nn.functional.cosine_similarity(patches, direction, dim=-1)


def build_llava(args):
    from transformers import CLIPConfig, CLIPModel, LlavaForConditionalGeneration

    config, clip_text = llava_configs(args.quick, args.lm_layers, args.tower_layers)
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config).eval()
    # CDPruner's clip=: the tower's own checkpoint (its weights shared, no second tower) and a CLIP text tower
    clip = CLIPModel(CLIPConfig(text_config=clip_text.to_dict(), projection_dim=config.vision_config.projection_dim,
                                vision_config=dict(config.vision_config.to_dict(), num_hidden_layers=0))).eval()
    tower = model.model.vision_tower
    clip.vision_model = getattr(tower, "vision_model", tower)
    size, patches = config.vision_config.image_size, (config.vision_config.image_size //
                                                      config.vision_config.patch_size) ** 2
    vocab = config.text_config.vocab_size
    inputs = prompt(text_ids(40, vocab, 1), [config.image_token_index] * patches, text_ids(16, vocab, 2))
    inputs["pixel_values"] = half_flat_image(size, 3)[None]
    text = config.text_config
    describe = (f"LLaVA-1.5, random weights: CLIP tower {config.vision_config.num_hidden_layers} layers x "
                f"{config.vision_config.hidden_size} (MLP {config.vision_config.intermediate_size}, "
                f"{config.vision_config.num_attention_heads} heads, {size} px / {config.vision_config.patch_size}: "
                f"{patches} patches, feature layer -2); Qwen2 language model {text.num_hidden_layers} layers x "
                f"{text.hidden_size} (MLP {text.intermediate_size}, {text.num_attention_heads} heads, "
                f"{text.num_key_value_heads} KV heads, vocabulary {vocab}); CDPruner's CLIP text tower "
                f"{clip_text.num_hidden_layers} layers x {clip_text.hidden_size}")
    extras = {"quota": dict(scorer=ramp_scorer), "cdpruner": dict(clip=clip, tokenizer=CharTokenizer(clip_text))}
    return model, {"image": (inputs, f"1 image {size} px, {patches} visual + 56 text tokens")}, describe, extras, [clip]


def build_qwen25(args):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    config = qwen25_config(args.quick, args.lm_layers, args.tower_layers)
    torch.manual_seed(args.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    vision, text, vocab = config.vision_config, config.text_config, config.text_config.vocab_size
    merge = vision.spatial_merge_size ** 2
    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size, temporal_patch_size=2,
                 min_pixels=28 * 28, max_pixels=1024 * 1024)
    image_size, frame_size = (112, 56) if args.quick else (336, 224)
    images = Qwen2VLImageProcessor(**sizes)([half_flat_image(image_size, 3)], return_tensors="pt", do_rescale=False)
    t, h, w = images["image_grid_thw"][0].tolist()
    tokens = t * h * w // merge
    image = prompt(text_ids(20, vocab, 1) + [config.vision_start_token_id],
                   [config.image_token_id] * tokens, [config.vision_end_token_id] + text_ids(16, vocab, 2))
    image.update(pixel_values=images["pixel_values"], image_grid_thw=images["image_grid_thw"],
                 mm_token_type_ids=(image["input_ids"] == config.image_token_id).int())
    frames = torch.stack([half_flat_image(frame_size, 10 + i) for i in range(4)])
    videos = Qwen2VLVideoProcessor(**sizes, cap_pixels_per_frame=False)(
        videos=[frames], return_tensors="pt", do_rescale=False, do_sample_frames=False)
    t, h, w = videos["video_grid_thw"][0].tolist()
    video_tokens = t * h * w // merge
    video = prompt(text_ids(20, vocab, 1) + [config.vision_start_token_id],
                   [config.video_token_id] * video_tokens, [config.vision_end_token_id] + text_ids(16, vocab, 2))
    video.update(pixel_values_videos=videos["pixel_values_videos"], video_grid_thw=videos["video_grid_thw"],
                 mm_token_type_ids=2 * (video["input_ids"] == config.video_token_id).int())
    describe = (f"Qwen2.5-VL, random weights: vision tower {vision.depth} layers x {vision.hidden_size} "
                f"(MLP {vision.intermediate_size}, {vision.num_heads} heads, windows of {vision.window_size} px, "
                f"layer {vision.depth - 1} global, 2 x 2 merge); language model {text.num_hidden_layers} layers x "
                f"{text.hidden_size} (MLP {text.intermediate_size}, {text.num_attention_heads} heads, "
                f"{text.num_key_value_heads} KV heads, vocabulary {vocab})")
    scenarios = {"image": (image, f"1 image {image_size} px, {tokens} visual + 37 text tokens"),
                 "video": (video, f"1 video of 4 frames {frame_size} px ({t} frame groups), {video_tokens} visual "
                                  f"+ 37 text tokens")}
    extras = {"quota": dict(scorer=ramp_scorer), "cdpruner": dict(scorer=text_similarity)}
    return model, scenarios, describe, extras, []


FAMILIES = {"llava": build_llava, "qwen2_5_vl": build_qwen25}


# --------------------------------------------------------------------------- measurements


def decoder_layer_flops(tokens, hidden, heads, kv_heads, head_dim, intermediate):
    """Multiply-adds of one Llama-like decoder layer on ``tokens`` tokens (batch 1): q/k/v/o projections,
    attention over the full square (as the fused kernel is counted), gated MLP."""
    n = tokens
    return n * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 2 * heads * n * n * head_dim \
        + 3 * n * hidden * intermediate


def language_model(model):
    return model.model.language_model


def prefill(model, inputs, question):
    extra = {} if question is None else {"question": question}
    return model(**inputs, **extra, use_cache=True, logits_to_keep=1)


def count_prefill(model, inputs, question):
    """(multiply-adds, tokens entering each language-model layer) of one prefill."""
    tokens = []

    def record(module, args, kwargs):
        tokens.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in language_model(model).layers]
    try:
        with FlopCounterMode(display=False, custom_mapping=SDPA_ON_CPU) as counter, torch.no_grad():
            prefill(model, inputs, question)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() // 2, tokens


def shared_copy(model):
    """A copy of ``model``'s modules that shares its weights (one set of weights for every setting)."""
    return copy.deepcopy(model, {id(t): t for t in itertools.chain(model.parameters(), model.buffers())})


def setting_name(method, options):
    return method if not options else method + " " + " ".join(f"{k}={v}" for k, v in options.items())


def runs_of(tokens):
    """``[650, 650, 362, 362]`` -> ``"650x2 362x2"``."""
    return " ".join(f"{n}x{len(list(group))}" for n, group in itertools.groupby(tokens))


def vlm_methods():
    """The registered methods that reduce a VLM's visual tokens, the paper-benchmarked ones first."""
    names = [n for n in REGISTRY if REGISTRY[n].target == "llava"]
    return [n for n in PAPER_SETTINGS if n in names] + sorted(n for n in names if n not in PAPER_SETTINGS)


def one_line(err):
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def measure_scenario(model, inputs, settings, args, external):
    """Count, time (interleaved) and measure the memory of every setting on ``inputs``."""
    rows = {}
    for name, (m, question) in settings.items():
        flops, tokens = count_prefill(m, inputs, question)
        rows[name] = dict(setting=name, gflops=flops / 1e9, flops=flops, lm_tokens=tokens)
    base = rows["uncompressed"]
    # reduces nothing: the same tokens in every language-model layer, no fewer FLOPs (cdpruner at a budget
    # of as many tokens as the image has still scores them)
    idle = [n for n in settings if n != "uncompressed" and rows[n]["flops"] >= base["flops"]
            and rows[n]["lm_tokens"] == base["lm_tokens"]]
    timed = [n for n in settings if n not in idle]
    weights = [t for m, _ in settings.values() for t in itertools.chain(m.parameters(), m.buffers())]
    for name in timed:
        m, question = settings[name]
        with torch.inference_mode():
            rows[name]["peak_bytes"] = peak_tensor_memory(lambda m=m, q=question: prefill(m, inputs, q),
                                                          weights + external + list(inputs.values()))
    seconds = {n: [] for n in timed}
    with torch.inference_mode():
        for i in range(args.warmup + args.runs):
            for name in timed[i % len(timed):] + timed[:i % len(timed)]:
                m, question = settings[name]
                start = time.perf_counter()
                prefill(m, inputs, question)
                if i >= args.warmup:
                    seconds[name].append(time.perf_counter() - start)
    for name in timed:
        ms = [1000 * s for s in seconds[name]]
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else ms * 3
        rows[name].update(ms=statistics.median(ms), ms_q1=q1, ms_q3=q3, ms_runs=ms)
    for name in timed:
        r = rows[name]
        r.update(flops_ratio=r["flops"] / base["flops"], speedup=base["ms"] / r["ms"],
                 memory_ratio=r["peak_bytes"] / base["peak_bytes"])
        r.update(ideal=1 / r["flops_ratio"], of_ideal=r["speedup"] * r["flops_ratio"],
                 raises_memory=r["peak_bytes"] > base["peak_bytes"])
    return [rows[n] for n in timed], idle, seconds


def print_table(rows):
    print(f"  {'setting':<38}{'tokens per LM layer':<24}{'GFLOPs':>8}{'ratio':>7}{'ms median [q1-q3]':>24}"
          f"{'speedup':>8}{'ideal':>7}{'of ideal':>9}{'peak MB':>9}{'memory':>8}")
    for r in rows:
        spread = f"{r['ms']:.1f} [{r['ms_q1']:.1f}-{r['ms_q3']:.1f}]"
        note = "  raises peak memory" if r["raises_memory"] else ""
        print(f"  {r['setting']:<38}{runs_of(r['lm_tokens']):<24}{r['gflops']:>8.2f}{r['flops_ratio']:>7.3f}"
              f"{spread:>24}{r['speedup']:>7.2f}x{r['ideal']:>6.2f}x{r['of_ideal']:>9.2f}"
              f"{r['peak_bytes'] / 2 ** 20:>9.1f}{r['memory_ratio']:>8.2f}{note}")


def run_family(family, args):
    """Every VLM method on ``family``'s scenarios; rows, and the lines of what did not run."""
    model, scenarios, describe, extras, external_modules = FAMILIES[family](args)
    external = [t for m in external_modules for t in itertools.chain(m.parameters(), m.buffers())]
    print(f"\n{family}: {describe}")
    support = vitcompress.supported(model)
    settings, skipped = {"uncompressed": (model, None)}, []
    for method in args.methods or vlm_methods():
        if support[method] is not True:
            skipped.append(f"{method}: not supported: {' '.join(str(support[method]).split())}")
            continue
        for options in PAPER_SETTINGS.get(method, [{}]):
            try:
                m = vitcompress.compress(shared_copy(model), method, **options, **extras.get(method, {}))
            except Exception as err:  # a method that says it fits and does not: one line, not raised
                skipped.append(f"{method}: compress failed: {one_line(err)}")
                break
            settings[setting_name(method, options)] = (m, QUESTION)  # the call's question, for the methods that read it
    for line in skipped:
        print(f"  {line}")
    rows, all_seconds = [], []
    for scenario, (inputs, what) in scenarios.items():
        print(f"  {scenario}: {what}")
        runnable, failed = {}, set()
        for name, (m, question) in settings.items():
            method = name.split()[0]
            if method in failed:
                continue
            try:
                with torch.no_grad():
                    prefill(m, inputs, question)
                runnable[name] = (m, question)
            except Exception as err:  # one line per method, not run on its other settings or scenarios
                failed.add(method)
                line = f"{method}: prefill failed on the {scenario}: {one_line(err)}"
                skipped.append(line)
                print(f"  {line}")
        settings = runnable
        scenario_rows, idle, seconds = measure_scenario(model, inputs, settings, args, external)
        for name in idle:
            line = f"{name}: reduces no token of the {scenario}"
            skipped.append(line)
            print(f"  {line}")
        print_table(scenario_rows)
        rows += [dict(r, family=family, scenario=scenario) for r in scenario_rows]
        all_seconds += list(seconds.values())
    return rows, skipped, all_seconds


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--methods", nargs="+", default=None, help="these VLM methods only (default: all)")
    ap.add_argument("--lm-layers", type=int, default=None, help="language-model layers (default 8, --quick 4; "
                                                                "the released 0.5B: 24, 3B: 36)")
    ap.add_argument("--tower-layers", type=int, default=4, help="vision-tower layers (CLIP-L: 24, Qwen2.5-VL: 32)")
    ap.add_argument("--runs", type=int, default=7, help="timed interleaved rounds (median, quartiles)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds, after one checking prefill per setting")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny widths, 2 runs, no warm-up: a test of the script")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.warmup = min(args.runs, 2), 0
    if args.lm_layers is None:
        args.lm_layers = 4 if args.quick else 8
    unknown = set(args.methods or ()) - set(vlm_methods())
    if unknown:
        ap.error(f"--methods: {', '.join(sorted(unknown))} not VLM methods; they are {', '.join(vlm_methods())}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    conditions = timing_conditions("cpu", torch.float32, 1)
    print(f"VLM prefill, {describe_conditions(conditions)}; torch {torch.__version__}; load average (1, 5, 15 min) "
          f"at start {load_start[0]:.1f} {load_start[1]:.1f} {load_start[2]:.1f}; {args.runs} interleaved runs "
          f"after {args.warmup} warm-up (median [quartiles])")
    rows, skipped, seconds = [], {}, []
    for family in args.families:
        family_rows, skipped[family], family_seconds = run_family(family, args)
        rows += family_rows
        seconds += family_seconds
    load_end = os.getloadavg()
    print(f"\nload average at end {load_end[0]:.1f} {load_end[1]:.1f} {load_end[2]:.1f}")
    warning = busy_warning([[1 / s for s in runs] for runs in seconds], dict(conditions, load=max(load_start[0],
                                                                                                 load_end[0])))
    if warning:
        print(f"WARNING: {warning}")
    result = {"conditions": conditions, "torch": torch.__version__, "load_start": load_start, "load_end": load_end,
              "timing_warning": warning, "rows": rows, "skipped": skipped}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
