"""A compressed VLM answering lmms-eval's requests, without lmms-eval.

lmms-eval (``pip install "vitcompress[lmms]"``) finds the model ``vitcompress`` through the entry point
``lmms_eval.models`` (:func:`manifest`); its class, :class:`vitcompress.evaluation.lmms_eval_model.VitCompress`,
is a thin shell around :class:`CompressedVLM` here, which loads any VLM transformers' ``AutoModelForImageTextToText``
and ``AutoProcessor`` load, compresses it with :func:`vitcompress.compress` (so every family an adapter supports
works, unchanged), and answers requests given as objects with lmms-eval's ``args`` tuples:

* ``generate_until``: ``(context, generation kwargs, doc_to_visual, doc_id, task, split)``;
* ``loglikelihood``: ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``,

the documents looked up in ``task_dict[task][split][doc_id]`` as lmms-eval's simple models do. After each prefill
the visual tokens the language model received (:func:`vitcompress.stats`; for the uncompressed model, the
placeholders of the prompt) are added to a :class:`VisualTokenTally`.
"""
import importlib
import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import api

#: the placeholders lmms-eval's task prompts may carry; the images and videos go where the chat template puts them
VISUAL_PLACEHOLDERS = ("<image>", "<video>")
#: the generation kwargs of lmms-eval's tasks that are ``generate`` arguments (tasks also carry ``until``, which cuts the
#: text, and model-specific ones such as ``image_aspect_ratio``)
GENERATE_ARGUMENTS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams",
                      "repetition_penalty", "length_penalty", "no_repeat_ngram_size")


def manifest():
    """The lmms-eval model registration (entry point group ``lmms_eval.models``): ``--model vitcompress``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vitcompress",
                         simple_class_path="vitcompress.evaluation.lmms_eval_model.VitCompress")


class VisualTokenTally:
    """Visual tokens before and after compression, summed over prefills (one prefill per batch), and the tokens
    generated."""

    def __init__(self):
        self.prefills = self.samples = self.before = self.after = self.generated = 0

    def add(self, before: int, after: int, samples: int, generated: int = 0) -> None:
        self.prefills += 1
        self.samples += samples
        self.before += before
        self.after += after
        self.generated += generated

    def merge(self, other: "VisualTokenTally") -> None:
        for name in ("prefills", "samples", "before", "after", "generated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> Dict[str, Any]:
        """Totals and per-sample means (``visual_tokens_kept``: after / before)."""
        per_sample = max(self.samples, 1)
        return {"prefills": self.prefills, "samples": self.samples, "generated_tokens": self.generated,
                "visual_tokens_before": self.before,
                "visual_tokens_after": self.after, "visual_tokens_before_per_sample": self.before / per_sample,
                "visual_tokens_after_per_sample": self.after / per_sample,
                "visual_tokens_kept": self.after / self.before if self.before else 1.0}


def budget_arguments(keep=None, r=None, flops=None) -> Dict[str, Any]:
    """The budget keywords of :func:`vitcompress.compress` from lmms-eval's parsed ``--model_args`` (which turn
    ``keep=1`` into an int): floats for ``keep`` / ``flops``, ``r`` as given."""
    out = {}
    if keep is not None:
        out["keep"] = float(keep)
    if flops is not None:
        out["flops"] = float(flops)
    if r is not None:
        out["r"] = r
    return out


def object_options(method: str, options: Dict[str, Any], device=None) -> Dict[str, Any]:
    """``options`` with the text lmms-eval's ``--model_args`` can carry for an option that takes an object (one
    whose default is None) made that object: ``clip:<hub id or directory>`` a transformers CLIP model (on
    ``device``) and, where the method has a ``tokenizer`` option not given, its tokenizer (QuoTA's built-in scorer);
    ``<module>:<name>`` the module's attribute (a QuoTA ``scorer(frames, question)``)."""
    accepted = api.describe(method)["options"]
    out = dict(options)
    for name, value in options.items():
        if not (isinstance(value, str) and ":" in value and name in accepted and accepted[name]["default"] is None):
            continue
        source, _, target = value.partition(":")
        if source == "clip":
            from transformers import AutoTokenizer, CLIPModel

            out[name] = CLIPModel.from_pretrained(target).eval().to(device)
            if "tokenizer" in accepted and "tokenizer" not in options:
                out["tokenizer"] = AutoTokenizer.from_pretrained(target)
        else:
            out[name] = getattr(importlib.import_module(source), target)
    return out


def split_visuals(visuals: Sequence[Any]) -> Tuple[List[Any], List[Any]]:
    """``(images, videos)`` of one document: a video is a ``[frames, H, W, 3]`` array or tensor (lmms-eval's
    ``read_video``), anything else (a PIL image, a ``[H, W, 3]`` array) an image."""
    images, videos = [], []
    for visual in visuals:
        (videos if getattr(visual, "ndim", 3) == 4 else images).append(visual)
    return images, videos


def plain_context(context: str) -> str:
    """A task's context without the ``<image>`` / ``<video>`` placeholders some tasks write into it."""
    for placeholder in VISUAL_PLACEHOLDERS:
        context = context.replace(placeholder, "")
    return context.strip()


def chat_prompt(processor, context: str, images: int, videos: int, chat_template: Optional[str] = None) -> str:
    """The prompt of one request: the context's own ``<image>`` / ``<video>`` placeholders removed, the user turn
    of the processor's chat template (or ``chat_template``) with the visuals first, then the generation prompt.
    Without a template: the processor's placeholders, a newline and the context."""
    context = plain_context(context)
    template = chat_template or getattr(processor, "chat_template", None)
    if template is None:
        tokens = processor.image_token * images + getattr(processor, "video_token", "") * videos
        return f"{tokens}\n{context}" if tokens else context
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": context}]
    return processor.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                         add_generation_prompt=True, tokenize=False)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def generate_arguments(gen_kwargs: Dict[str, Any], default_max_new_tokens: int) -> Dict[str, Any]:
    """lmms-eval's generation kwargs -> ``generate``'s (:data:`GENERATE_ARGUMENTS`): greedy unless ``temperature``
    > 0 (as lmms-eval's models read ``do_sample``), ``max_new_tokens`` defaulted."""
    out = {k: v for k, v in gen_kwargs.items() if k in GENERATE_ARGUMENTS and v is not None}
    out.setdefault("max_new_tokens", default_max_new_tokens)
    temperature = out.pop("temperature", 0)
    out["do_sample"] = temperature > 0
    if out["do_sample"]:
        out["temperature"] = temperature
    else:
        out.pop("top_p", None)
        out.pop("top_k", None)
    return out


def load_vlm(pretrained: str, dtype="auto", trust_remote_code: bool = False, attn_implementation=None):
    """``(model, processor)`` of a checkpoint (hub id or local directory) through transformers' auto classes;
    the tokenizer pads on the left, as batched generation needs, with its end-of-sequence token if it has no pad."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:  # batches need one (Llama tokenizers have none)
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model, processor


class CompressedVLM:
    """A VLM, its processor and its compression (``method`` None: the model as it is, the baseline), answering
    lmms-eval requests; ``tally`` counts the visual tokens of every prefill."""

    def __init__(self, model, processor, method: Optional[str] = None, budget: Optional[Dict[str, Any]] = None,
                 options: Optional[Dict[str, Any]] = None, device=None, batch_size: int = 1,
                 max_new_tokens: int = 256, chat_template: Optional[str] = None,
                 load_video: Optional[Callable[[str], Any]] = None):
        self.model, self.processor = model, processor
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.method = method
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.chat_template = chat_template
        self.load_video = load_video
        self.tally = VisualTokenTally()
        self.asks_question = False
        if method is not None:
            api.compress(model, method, **(budget or {}), **object_options(method, options or {}, self.device))
            # a VLM method is handed the question (QuoTA); a ViT method inside the tower takes none
            self.asks_question = api.describe(method)["target"] == "llava"

    # ---------------------------------------------------------------- inputs
    def _visuals(self, visuals) -> Tuple[List[Any], List[Any]]:
        visuals = [v for v in (visuals or []) if v is not None]
        if any(isinstance(v, str) for v in visuals):
            if self.load_video is None:
                raise ValueError("a video given by its path needs load_video= (lmms-eval's read_video)")
            visuals = [self.load_video(v) if isinstance(v, str) else v for v in visuals]
        return split_visuals(visuals)

    def inputs(self, texts: List[str], visuals: List[Tuple[List[Any], List[Any]]]):
        """The processor's batch (left-padded) for ``texts`` with each sample's ``(images, videos)``, on the
        model's device and floating dtype."""
        images = [i for sample, _ in visuals for i in sample]
        videos = [v for _, sample in visuals for v in sample]
        kwargs = dict(text=texts, return_tensors="pt", padding=True)
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
        return self.processor(**kwargs).to(self.device, dtype=self.model.dtype)

    def _count(self, input_ids, generated: int = 0) -> None:
        """Add this prefill's visual tokens to the tally: the compressed model's report, or the placeholders."""
        if self.method is not None:
            stats = api.stats(self.model)
            before, after = stats.get("visual_tokens_before", 0), stats.get("visual_tokens_after", 0)
        else:
            ids = [getattr(self.processor, name, None) for name in ("image_token_id", "video_token_id")]
            before = after = sum(int((input_ids == i).sum()) for i in ids if i is not None)
        self.tally.add(before, after, len(input_ids), generated)

    def _question(self, contexts: List[str]) -> Dict[str, Any]:
        return {"question": [plain_context(c) for c in contexts]} if self.asks_question else {}

    # ---------------------------------------------------------------- the two request types
    @torch.no_grad()
    def generate(self, contexts: List[str], visuals: List[Sequence[Any]], gen_kwargs: Dict[str, Any]) -> List[str]:
        """One batch: each context's greedy (or sampled) answer, cut at ``gen_kwargs["until"]``."""
        samples = [self._visuals(v) for v in visuals]
        texts = [chat_prompt(self.processor, c, len(i), len(v), self.chat_template) for c, (i, v) in zip(contexts, samples)]
        inputs = self.inputs(texts, samples)
        tokenizer = self.processor.tokenizer
        until = gen_kwargs.get("until") or [tokenizer.decode([tokenizer.eos_token_id])]
        until = [until] if isinstance(until, str) else list(until)
        out = self.model.generate(**inputs, **generate_arguments(gen_kwargs, self.max_new_tokens),
                                  pad_token_id=tokenizer.pad_token_id, **self._question(contexts))
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        self._count(inputs["input_ids"], int((new_tokens != tokenizer.pad_token_id).sum()))
        answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop(a, until) for a in answers]

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str, visuals: Sequence[Any]) -> Tuple[float, bool]:
        """``(log p(continuation | prompt), whether greedy decoding gives the continuation)``; the continuation's
        tokens are those the whole text has beyond the prompt's (as lm-eval counts them)."""
        images, videos = self._visuals(visuals)
        prompt = chat_prompt(self.processor, context, len(images), len(videos), self.chat_template)
        tokenizer = self.processor.tokenizer
        length = len(tokenizer(prompt + continuation).input_ids) - len(tokenizer(prompt).input_ids)
        if length <= 0:
            raise ValueError(f"the continuation {continuation!r} adds no token to the prompt")
        inputs = self.inputs([prompt + continuation], [(images, videos)])
        # the compressed model's logits follow its rewritten (shorter) prompt; the continuation ends both
        logits = self.model(**inputs, **self._question([context])).logits[0, -length - 1:-1].float()
        self._count(inputs["input_ids"])
        target = inputs["input_ids"][0, -length:]
        logprobs = torch.log_softmax(logits, dim=-1)
        return float(logprobs.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())

    # ---------------------------------------------------------------- lmms-eval's requests
    def generate_until(self, requests: Sequence[Any], task_dict: Dict[str, Any]) -> List[str]:
        """Answers in request order; batches of ``batch_size`` requests sharing their generation kwargs."""
        answers: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                args = [requests[i].args for i in batch]
                visuals = [_document_visuals(a[2], task_dict, *a[3:6]) for a in args]
                for i, answer in zip(batch, self.generate([a[0] for a in args], visuals, dict(args[0][1]))):
                    answers[i] = answer
        return answers

    def loglikelihoods(self, requests: Sequence[Any], task_dict: Dict[str, Any]) -> List[Tuple[float, bool]]:
        out = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            if not isinstance(target, str):
                target = target(task_dict[task][split][doc_id])
            out.append(self.loglikelihood(context, target, _document_visuals(doc_to_visual, task_dict, doc_id,
                                                                              task, split)))
        return out


def _document_visuals(doc_to_visual, task_dict, doc_id, task, split) -> List[Any]:
    """The visuals of one document (lmms-eval's ``doc_to_visual(doc)``, a list; None for a text-only task)."""
    if doc_to_visual is None:
        return []
    visuals = doc_to_visual(task_dict[task][split][doc_id])
    return list(visuals or [])
