"""The lmms-eval model ``vitcompress`` (needs ``pip install "vitcompress[lmms]"``): a compressed VLM in lmms-eval.

    python -m lmms_eval --model vitcompress \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=pitome,keep=0.5 --tasks mme

``--model_args``: ``pretrained`` (hub id or directory), ``method`` (none: the uncompressed baseline), one budget
(``keep``, ``r`` or ``flops``), the method's options by name (``margin=0.9``), and ``device``, ``dtype``,
``batch_size``, ``max_new_tokens``, ``max_frames_num`` (frames read per video), ``chat_template``,
``attn_implementation``, ``trust_remote_code``. The request handling is :mod:`vitcompress.evaluation.lmms`'s; this
module only adapts it to lmms-eval's model class and reports the visual tokens through lmms-eval's metric log, which
its results file keeps under ``throughput`` (``avg_visual_tokens_kept`` ...) next to the task scores.
"""
import time
from typing import List, Optional, Tuple

import torch
from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.model_utils.load_video import read_video
from loguru import logger

from .lmms import CompressedVLM, VisualTokenTally, budget_arguments, load_vlm


#: what each call records in lmms-eval's metric log; its summary (the results file's ``throughput``) gives their mean
#: over calls as ``avg_<name>``
PER_SAMPLE = ("visual_tokens_before_per_sample", "visual_tokens_after_per_sample", "visual_tokens_kept")


class VitCompress(lmms):
    """lmms-eval's simple-model interface over :class:`~vitcompress.evaluation.lmms.CompressedVLM`."""

    is_simple = True

    def __init__(self, pretrained: str, method: Optional[str] = None, keep=None, r=None, flops=None,
                 device: Optional[str] = None, dtype: str = "auto", batch_size: int = 1, max_new_tokens: int = 256,
                 max_frames_num: int = 8, chat_template: Optional[str] = None, attn_implementation=None,
                 trust_remote_code: bool = False, max_batch_size=None, **options):
        """``max_batch_size``: lmms-eval passes it to every model; batches here are ``batch_size``."""
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = load_vlm(pretrained, dtype, trust_remote_code, attn_implementation)
        self.vlm = CompressedVLM(model, processor, method, budget_arguments(keep, r, flops), options, device,
                                 batch_size, max_new_tokens, chat_template,
                                 load_video=lambda path: read_video(path, num_frm=int(max_frames_num)))
        self.chat_template = chat_template
        self.run_tally = VisualTokenTally()  # every call's prefills; the vlm's own tally counts one call
        self._device = self.vlm.device

    @property
    def model(self):
        return self.vlm.model

    @property
    def tokenizer(self):
        return self.vlm.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.vlm.batch_size

    def generate_until(self, requests) -> List[str]:
        return self._reported(lambda: self.vlm.generate_until(requests, self.task_dict), "generate_until")

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        out = self._reported(lambda: self.vlm.loglikelihoods(requests, self.task_dict), "loglikelihood")
        if unwrap_generation_output((0.0, True))[0] == (0.0, True):
            return out
        # lmms-eval 0.7.3 turns every answer that is not a string into str(answer), a (logprob, greedy) pair
        # included, and multiple-choice scoring then fails; it hands a GenerationResult's text on as it is
        return [GenerationResult(text=pair) for pair in out]

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("vitcompress answers generate_until and loglikelihood requests; multi-round "
                                  "tasks are not supported")

    def _reported(self, answer, kind):
        """``answer()``, with the visual tokens of its prefills logged and recorded in lmms-eval's metrics."""
        self.vlm.tally, start = VisualTokenTally(), time.perf_counter()
        try:
            out = answer()
        finally:
            self.run_tally.merge(self.vlm.tally)
        elapsed, summary = time.perf_counter() - start, self.vlm.tally.summary()
        logger.info(f"vitcompress {kind}: {summary['visual_tokens_after']} of {summary['visual_tokens_before']} "
                    f"visual tokens kept ({summary['visual_tokens_kept']:.1%}) over {summary['samples']} samples; "
                    f"whole run: {self.run_tally.summary()}")
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=summary["generated_tokens"],
                    avg_speed=summary["generated_tokens"] / elapsed if elapsed > 0 else 0.0,
                    additional_metrics=dict({k: summary[k] for k in PER_SAMPLE}, total_requests=summary["samples"]))
        return out
