"""The lmms-eval model ``vitcompress`` on a tiny random LLaVA-1.5 (and Qwen2-VL, Qwen2.5-VL, InternVL) saved with
``save_pretrained`` (processor and tokenizer built offline): requests built here, no hub, no dataset. The request
handling (``vitcompress.evaluation.lmms``) runs without lmms-eval; the registration and lmms-eval's model class run
where lmms-eval is installed (the ``lmms`` extra, not part of ``all``)."""
import numpy as np
import pytest
import torch

import vitcompress
from vitcompress.evaluation.lmms import (CompressedVLM, budget_arguments, chat_prompt, cut_at_stop, generate_arguments,
                                         load_vlm)
from vitcompress.testing import LLAVA_IMAGE_TOKEN, LLAVA_PATCHES, tiny_llava_checkpoint

TASK, SPLIT = "toy", "test"
GEN_KWARGS = {"until": ["."], "max_new_tokens": 5}


def picture(seed, height, width):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


#: documents as lmms-eval's task_dict holds them; one prompt carries the <image> placeholder a task may put in
DOCS = [{"image": picture(0, 40, 50), "question": "what is shown ?", "answer": " a cat"},
        {"image": picture(1, 32, 32), "question": "<image> what is in the picture ?", "answer": " red"},
        {"image": picture(2, 48, 36), "question": "is the cat blue ?", "answer": " no"}]
TASK_DICT = {TASK: {SPLIT: DOCS}}


class Request:
    """What the model reads of lmms-eval's ``Instance``: its ``args``."""

    def __init__(self, *args):
        self.args = args


def doc_to_visual(doc):
    return [doc["image"]]


def doc_to_target(doc):
    return doc["answer"]


def generate_requests(task=TASK):
    docs = TASK_DICT[task][SPLIT]
    return [Request(doc["question"], dict(GEN_KWARGS), doc_to_visual, i, task, SPLIT) for i, doc in enumerate(docs)]


def loglikelihood_requests(task=TASK):
    """The answer as lmms-eval gives it for a multiple-choice task (a string) or a task's target (a function)."""
    docs = TASK_DICT[task][SPLIT]
    return ([Request(doc["question"], doc["answer"], doc_to_visual, i, task, SPLIT) for i, doc in enumerate(docs)]
            + [Request(docs[0]["question"], doc_to_target, doc_to_visual, 2, task, SPLIT)])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(tiny_llava_checkpoint(tmp_path_factory.mktemp("tiny_llava")))


def answer_all(checkpoint, method=None, batch_size=1, **budget):
    """Answers, loglikelihoods and the visual-token tally of the checkpoint loaded and compressed as lmms-eval's
    ``--model_args`` would."""
    model, processor = load_vlm(checkpoint, dtype="float32")
    vlm = CompressedVLM(model, processor, method, budget_arguments(**budget), device="cpu", batch_size=batch_size)
    answers = vlm.generate_until(generate_requests(), TASK_DICT)
    loglikelihoods = vlm.loglikelihoods(loglikelihood_requests(), TASK_DICT)
    return answers, loglikelihoods, vlm.tally.summary(), vlm


@pytest.fixture(scope="module")
def uncompressed(checkpoint):
    return answer_all(checkpoint)


@pytest.mark.parametrize("method", ["pitome", "tome"])
def test_keep_1_answers_as_the_uncompressed_model(checkpoint, uncompressed, method):
    answers, loglikelihoods, tally, vlm = answer_all(checkpoint, method, keep=1)  # lmms-eval parses keep=1 as an int
    base_answers, base_loglikelihoods, base_tally, _ = uncompressed
    assert vitcompress.stats(vlm.model)["method"] == method
    assert answers == base_answers and all(a.strip() for a in answers)
    assert [g for _, g in loglikelihoods] == [g for _, g in base_loglikelihoods]
    np.testing.assert_allclose([lp for lp, _ in loglikelihoods], [lp for lp, _ in base_loglikelihoods], rtol=0,
                               atol=1e-5)
    # every image keeps its 64 patches: 3 generate prefills + 4 loglikelihood prefills of one image each
    assert tally == base_tally and tally["visual_tokens_before"] == tally["visual_tokens_after"] == 7 * LLAVA_PATCHES
    assert tally["samples"] == 7 and tally["visual_tokens_kept"] == 1.0
    # the greedy flag: the first word the model answers is its greedy continuation
    first_word = " " + answers[0].split()[0]
    assert vlm.loglikelihood(DOCS[0]["question"], first_word, [DOCS[0]["image"]])[1]


def direct_loglikelihood(model, processor, doc):
    """log p(answer | prompt) of ``model`` as compressed by the caller, from the processor's inputs (the same
    chat template, written out here)."""
    prompt = f"USER: <image>{doc['question'].replace('<image>', '').strip()} ASSISTANT:"
    inputs = processor(text=[prompt + doc["answer"]], images=[doc["image"]], return_tensors="pt")
    length = len(processor.tokenizer(doc["answer"]).input_ids)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -length - 1:-1]
    target = inputs["input_ids"][0, -length:]
    return float(torch.log_softmax(logits, -1)[torch.arange(length), target].sum()), vitcompress.stats(model)


@pytest.mark.parametrize("method", ["pitome", "tome"])
def test_keep_below_1_reports_fewer_tokens_and_the_methods_loglikelihoods(checkpoint, uncompressed, method):
    _, loglikelihoods, tally, _ = answer_all(checkpoint, method, keep=0.7)
    model, processor = load_vlm(checkpoint, dtype="float32")
    vitcompress.compress(model, method, keep=0.7)
    expected, stats = zip(*(direct_loglikelihood(model, processor, doc) for doc in DOCS))
    np.testing.assert_allclose([lp for lp, _ in loglikelihoods[:3]], expected, rtol=0, atol=1e-5)
    assert not np.allclose(expected, [lp for lp, _ in uncompressed[1][:3]], atol=1e-3)
    # the tower's planned output (minus CLS) per image, as the directly compressed model reports it
    per_image = stats[0]["visual_tokens_after"]
    assert per_image == stats[0]["tower"]["planned_tokens_per_layer"][-1] - 1 < LLAVA_PATCHES
    assert tally["visual_tokens_before"] == 7 * LLAVA_PATCHES and tally["visual_tokens_after"] == 7 * per_image
    assert tally["visual_tokens_kept"] == per_image / LLAVA_PATCHES


def test_batches_answer_as_single_requests(checkpoint):
    """batch_size=2: prompts of different lengths left-padded in one generate; requests with other generation
    kwargs go to their own batch; answers come back in request order."""
    alone = answer_all(checkpoint, "pitome", keep=0.7)[0]
    model, processor = load_vlm(checkpoint, dtype="float32")
    vlm = CompressedVLM(model, processor, "pitome", {"keep": 0.7}, device="cpu", batch_size=2)
    requests = generate_requests()
    shorter = Request(DOCS[0]["question"], {"until": ["."], "max_new_tokens": 2}, doc_to_visual, 0, TASK, SPLIT)
    requests.insert(1, shorter)
    answers = vlm.generate_until(requests, TASK_DICT)
    assert vlm.tally.prefills == 3 and vlm.tally.samples == 4
    assert answers[:1] + answers[2:] == alone
    assert answers[1] == vlm.generate_until([shorter], TASK_DICT)[0] == " ".join(alone[0].split()[:2])


def test_quota_takes_its_scorer_from_the_command_line(checkpoint, tmp_path):
    """``scorer=<module>:<name>`` imports a scorer, ``scorer=clip:<directory>`` loads a CLIP model and its tokenizer;
    the wrapper hands QuoTA each request's question (it refuses a call without one)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from vitcompress.testing import LLAVA_VISION

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(vision_config=dict(LLAVA_VISION), text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=16), projection_dim=16)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(tmp_path)
    for scorer in ("vitcompress.testing:ramp_scorer", f"clip:{tmp_path}"):
        model, processor = load_vlm(checkpoint, dtype="float32")
        vlm = CompressedVLM(model, processor, "quota", {"keep": 0.5}, {"scorer": scorer}, device="cpu")
        vlm.loglikelihoods(loglikelihood_requests()[:1], TASK_DICT)
        stats = vitcompress.stats(model)
        assert stats["method"] == "quota" and stats["options"]["scorer"] in ("function", "CLIPModel")
        assert vlm.tally.after == stats["visual_tokens_after"] <= LLAVA_PATCHES // 2 < vlm.tally.before


def test_videos_read_from_their_path_reach_the_method(tmp_path):
    """A NeXT-Video checkpoint: a video given by its path (as lmms-eval's video tasks give it) is read by
    ``load_video`` and goes to the processor as a video; QuoTA reduces it, and the loglikelihood equals the model
    compressed directly on the processor's inputs with the same question."""
    from vitcompress.testing import ramp_scorer

    checkpoint = str(tiny_llava_checkpoint(tmp_path, "next_video"))
    frames = (np.random.RandomState(4).rand(4, 40, 40, 3) * 255).astype("uint8")
    read = []

    def load_video(path):
        read.append(path)
        return frames

    results = {}
    for method in (None, "quota"):
        model, processor = load_vlm(checkpoint, dtype="float32")
        options = {} if method is None else {"scorer": "vitcompress.testing:ramp_scorer"}
        vlm = CompressedVLM(model, processor, method, {"keep": 0.5} if method else {}, options, device="cpu",
                            load_video=load_video)
        results[method] = vlm.loglikelihood("<video> what is shown ?", " a cat", ["clip.mp4"]), vlm.tally.summary()
    assert read == ["clip.mp4"] * 2
    (_, base), (loglikelihood, tally) = results[None], results["quota"]
    per_video = (32 // 4 // 2) ** 2 * len(frames)  # the 8x8 patch grid pooled 2x2, per frame
    assert base["visual_tokens_before"] == base["visual_tokens_after"] == tally["visual_tokens_before"] == per_video
    assert tally["visual_tokens_after"] <= per_video // 2
    model, processor = load_vlm(checkpoint, dtype="float32")
    vitcompress.compress(model, "quota", keep=0.5, scorer=ramp_scorer)
    inputs = processor(text=["USER: <video>what is shown ? ASSISTANT: a cat"], videos=[frames], return_tensors="pt")
    length = len(processor.tokenizer(" a cat").input_ids)
    with torch.no_grad():
        logits = model(**inputs, question="what is shown ?").logits[0, -length - 1:-1]
    target = inputs["input_ids"][0, -length:]
    expected = float(torch.log_softmax(logits, -1)[torch.arange(length), target].sum())
    assert loglikelihood[0] == pytest.approx(expected, abs=1e-5)
    assert vitcompress.stats(model)["visual_tokens_after"] == tally["visual_tokens_after"]


def test_request_helpers():
    assert budget_arguments(keep=1) == {"keep": 1.0} and isinstance(budget_arguments(keep=1)["keep"], float)
    assert budget_arguments(r=4, flops=1) == {"r": 4, "flops": 1.0}
    assert cut_at_stop("a cat. and a dog\n\nUSER", [".", "\n\n"]) == "a cat"
    assert generate_arguments({"until": ["."], "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": True,
                               "image_aspect_ratio": "original"}, 16) == \
        {"max_new_tokens": 16, "do_sample": False, "num_beams": 1}
    assert generate_arguments({"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 3}, 16) == \
        {"max_new_tokens": 3, "do_sample": True, "temperature": 0.5, "top_p": 0.9}


def test_prompt_puts_the_images_where_the_template_says(checkpoint):
    _, processor = load_vlm(checkpoint)
    assert chat_prompt(processor, "<image>\nwhat is shown ?", 2, 0) == "USER: <image><image>what is shown ? ASSISTANT:"
    processor.chat_template = None
    assert chat_prompt(processor, "what is shown ?", 1, 0) == "<image>\nwhat is shown ?"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == LLAVA_IMAGE_TOKEN


# ------------------------------------------------------------------ with lmms-eval installed (the lmms extra)


def test_lmms_eval_finds_the_model_and_records_the_visual_tokens(checkpoint):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance, unwrap_generation_output
    from lmms_eval.models import get_model
    from lmms_eval.models.model_utils.gen_metrics import reset_logged_metrics, summarize_logged_metrics

    from vitcompress.evaluation.lmms_eval_model import VitCompress

    cls = get_model("vitcompress")
    assert cls is VitCompress
    lmm = cls.create_from_arg_string(f"pretrained={checkpoint},method=pitome,keep=0.7,device=cpu,dtype=float32")
    lmm.task_dict = TASK_DICT
    meta = {"task": TASK, "doc_id": 0, "repeats": 1}
    reset_logged_metrics()
    answers = lmm.generate_until([Instance("generate_until", r.args, i, dict(meta, doc_id=r.args[3]))
                                  for i, r in enumerate(generate_requests())])
    loglikelihoods = lmm.loglikelihood([Instance("loglikelihood", r.args, i, dict(meta, doc_id=r.args[3]))
                                        for i, r in enumerate(loglikelihood_requests())])
    expected_answers, expected_loglikelihoods, tally, _ = answer_all(checkpoint, "pitome", keep=0.7)
    # what lmms-eval's evaluator keeps of each answer
    assert answers == expected_answers
    assert [unwrap_generation_output(x)[0] for x in loglikelihoods] == expected_loglikelihoods
    summary = summarize_logged_metrics()  # what lmms-eval writes under "throughput" in its results file
    assert summary["avg_visual_tokens_before_per_sample"] == LLAVA_PATCHES
    assert summary["avg_visual_tokens_after_per_sample"] == tally["visual_tokens_after"] / 7 < LLAVA_PATCHES
    assert summary["avg_visual_tokens_kept"] == tally["visual_tokens_kept"]
    assert lmm.run_tally.summary() == tally


TASK_YAML = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: {name}
test_split: test
output_type: {output_type}
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
{target}
metric_list:
  - metric: {metric}
metadata:
  - version: 0.0
"""


@pytest.mark.slow
def test_the_lmms_eval_command_scores_a_local_task_and_reports_the_visual_tokens(checkpoint, tmp_path):
    """``python -m lmms_eval --model vitcompress`` in a fresh process (the entry point) on two tasks of local files:
    a generated answer (exact match) and a multiple choice (loglikelihoods); the results file has both scores and the
    visual tokens kept."""
    pytest.importorskip("lmms_eval")
    import json
    import os
    import subprocess
    import sys

    rows = []
    for i, doc in enumerate(DOCS):
        doc["image"].save(tmp_path / f"image{i}.png")
        rows.append({"image": str(tmp_path / f"image{i}.png"), "question": doc["question"], "answer": doc["answer"],
                     "choices": [doc["answer"], " dog"]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "toy_utils.py").write_text("from PIL import Image\n\n\ndef doc_to_visual(doc):\n"
                                           "    return [Image.open(doc['image']).convert('RGB')]\n")
    tasks = {"toy_gen": ("generate_until", 'doc_to_target: "answer"\ngeneration_kwargs:\n  max_new_tokens: 4',
                         "exact_match"),
             "toy_choice": ("multiple_choice", 'doc_to_choice: "{{choices}}"\ndoc_to_target: 0', "acc")}
    for name, (output_type, target, metric) in tasks.items():
        (tmp_path / f"{name}.yaml").write_text(TASK_YAML.format(data=tmp_path / "data.jsonl", name=name,
                                                                output_type=output_type, target=target, metric=metric))
    command = [sys.executable, "-m", "lmms_eval", "--model", "vitcompress", "--model_args",
               f"pretrained={checkpoint},method=pitome,keep=0.7,device=cpu,dtype=float32", "--tasks",
               "toy_gen,toy_choice", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
               "--batch_size", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    results = [p for p in (tmp_path / "out").rglob("*_results.json")]
    assert len(results) == 1, (out.stdout + out.stderr)[-3000:]
    report = json.loads(results[0].read_text())
    assert set(report["results"]) == {"toy_gen", "toy_choice"}
    assert "exact_match,none" in report["results"]["toy_gen"] and "acc,none" in report["results"]["toy_choice"]
    _, _, tally, _ = answer_all(checkpoint, "pitome", keep=0.7)
    assert report["throughput"]["avg_visual_tokens_before_per_sample"] == LLAVA_PATCHES
    assert report["throughput"]["avg_visual_tokens_kept"] == tally["visual_tokens_kept"] < 1


# ------------------------------------------------------------------ Qwen2-VL, Qwen2.5-VL and InternVL (issue 27)

FAMILIES = ("qwen2", "qwen2_5", "internvl")
#: keeps every visual token (tokencorr's budget ceil(rho * N) times c, capped at N)
KEEP_EVERY_TOKEN = {"c": 10 ** 6}
HALF_FLAT = "half_flat"


def half_flat(seed, height, width):
    """A picture flat grey on the left and noise on the right: tokencorr's default budget drops some of its tokens."""
    from PIL import Image

    pixels = np.full((height, width, 3), 120, "uint8")
    pixels[:, width // 2:] = (np.random.RandomState(seed).rand(height, width - width // 2, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


TASK_DICT[HALF_FLAT] = {SPLIT: [dict(doc, image=half_flat(i, *doc["image"].size[::-1])) for i, doc in enumerate(DOCS)]}


@pytest.fixture(scope="module", params=FAMILIES)
def family_checkpoint(request, tmp_path_factory):
    from vitcompress.testing import tiny_vlm_checkpoint

    return request.param, str(tiny_vlm_checkpoint(tmp_path_factory.mktemp(request.param), request.param))


def family_answers(checkpoint, method=None, options=None):
    model, processor = load_vlm(checkpoint, dtype="float32")
    vlm = CompressedVLM(model, processor, method, {}, options, device="cpu")
    answers = vlm.generate_until(generate_requests(HALF_FLAT), TASK_DICT)
    loglikelihoods = vlm.loglikelihoods(loglikelihood_requests(HALF_FLAT), TASK_DICT)
    return answers, loglikelihoods, vlm.tally.summary(), processor


def placeholders_per_image(family, processor, image):
    """The visual tokens the language model reads for one image, from the family's image processor alone: Qwen-VL's
    patch grid merged 2 x 2; InternVL's tiles (thumbnail included) of 16 tokens each."""
    pixels = processor.image_processor([image], return_tensors="pt")
    if family == "internvl":
        return int(pixels["num_patches"][0]) * 16
    return int(pixels["image_grid_thw"].prod()) // 4


def test_qwen_vl_and_internvl_answer_as_the_uncompressed_model_when_every_token_is_kept(family_checkpoint):
    """tokencorr keeping every token: the same answers and loglikelihoods as the model loaded without compression,
    and the same visual tokens (the processor's placeholders); the default budget keeps fewer and moves the
    loglikelihoods."""
    family, checkpoint = family_checkpoint
    base_answers, base_loglikelihoods, base_tally, processor = family_answers(checkpoint)
    answers, loglikelihoods, tally, _ = family_answers(checkpoint, "tokencorr", KEEP_EVERY_TOKEN)
    assert answers == base_answers and all(a.strip() for a in answers)
    assert [g for _, g in loglikelihoods] == [g for _, g in base_loglikelihoods]
    np.testing.assert_allclose([lp for lp, _ in loglikelihoods], [lp for lp, _ in base_loglikelihoods], rtol=0,
                               atol=1e-5)
    # 3 generate prefills + 4 loglikelihood prefills, one image each (the last one document 2's)
    images = [doc["image"] for doc in TASK_DICT[HALF_FLAT][SPLIT]]
    expected = sum(placeholders_per_image(family, processor, images[i]) for i in (0, 1, 2, 0, 1, 2, 2))
    assert base_tally == tally and tally["visual_tokens_before"] == tally["visual_tokens_after"] == expected
    _, compressed, default, _ = family_answers(checkpoint, "tokencorr")
    assert default["visual_tokens_before"] == expected and default["visual_tokens_after"] < expected
    assert not np.allclose([lp for lp, _ in compressed], [lp for lp, _ in base_loglikelihoods], atol=1e-4)


#: a video's placeholders as each family's chat template writes them
VIDEO_PLACEHOLDER = {"qwen2": "<|vision_start|><|video_pad|><|vision_end|>", "internvl": "<video>"}
VIDEO_PLACEHOLDER["qwen2_5"] = VIDEO_PLACEHOLDER["qwen2"]


def test_qwen_vl_and_internvl_hand_quota_the_question_of_a_video_request(family_checkpoint):
    """QuoTA on a video read from its path: the wrapper's loglikelihood equals the model compressed directly on the
    processor's inputs with the same question, and the tally reports the placeholders before and fewer after."""
    from vitcompress.testing import ramp_scorer

    family, checkpoint = family_checkpoint
    frames = (np.random.RandomState(4).rand(4, 32, 32, 3) * 255).astype("uint8")
    results = {}
    for method in (None, "quota"):
        model, processor = load_vlm(checkpoint, dtype="float32")
        options = {"scorer": "vitcompress.testing:ramp_scorer"} if method else {}
        vlm = CompressedVLM(model, processor, method, {"keep": 0.5} if method else {}, options, device="cpu",
                            load_video=lambda path: frames)
        results[method] = vlm.loglikelihood("<video> what is shown ?", " a cat", ["clip.mp4"]), vlm.tally.summary()
    (_, base), (loglikelihood, tally) = results[None], results["quota"]
    model, processor = load_vlm(checkpoint, dtype="float32")
    inputs = processor(text=[f"USER: {VIDEO_PLACEHOLDER[family]}what is shown ? ASSISTANT: a cat"], videos=[frames],
                       return_tensors="pt")
    placeholders = int((inputs["input_ids"] == processor.image_token_id).sum()
                       + (inputs["input_ids"] == getattr(processor, "video_token_id", -1)).sum())
    assert base["visual_tokens_before"] == base["visual_tokens_after"] == tally["visual_tokens_before"] == placeholders
    assert 0 < tally["visual_tokens_after"] <= placeholders // 2
    vitcompress.compress(model, "quota", keep=0.5, scorer=ramp_scorer)
    length = len(processor.tokenizer(" a cat").input_ids)
    with torch.no_grad():
        logits = model(**inputs, question="what is shown ?").logits[0, -length - 1:-1]
    target = inputs["input_ids"][0, -length:]
    expected = float(torch.log_softmax(logits, -1)[torch.arange(length), target].sum())
    assert loglikelihood[0] == pytest.approx(expected, abs=1e-5)
    assert vitcompress.stats(model)["visual_tokens_after"] == tally["visual_tokens_after"]
