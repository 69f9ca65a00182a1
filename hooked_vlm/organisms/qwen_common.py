"""What the Qwen organisms share: their special tokens, the Qwen input builder and the answer mask."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from hooked_vlm.inputs import build_qwen_inputs
from hooked_vlm.organisms.base import AnswerOrganism, Example

__all__ = ["QWEN_SPECIALS", "QwenAnswerOrganism", "answer_mask"]

#: extra_special_tokens roles -> tokens, as the real Qwen tokenizers name them
QWEN_SPECIALS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def answer_mask(attention_mask: Tensor, answer_lengths: list[int]) -> Tensor:
    """``[B, L]`` bool, True on the last ``answer_lengths[b]`` real tokens of each right-padded row."""
    last = attention_mask.sum(-1) - 1
    pos = torch.arange(attention_mask.shape[1])[None]
    lengths = torch.tensor(answer_lengths)[:, None]
    return (pos <= last[:, None]) & (pos > last[:, None] - lengths)


class QwenAnswerOrganism(AnswerOrganism):
    """An answer organism of the Qwen2-VL / Qwen2.5-VL families; inputs via ``hooked_vlm.inputs.build_qwen_inputs``."""

    special_tokens: ClassVar[dict[str, str]] = QWEN_SPECIALS
    #: keyword arguments of ``build_qwen_inputs`` (pixel limits that keep the organism's image size)
    input_kwargs: ClassVar[dict[str, Any]] = {}

    def inputs(self, examples: list[Example], tokenizer: Any, with_answer: bool = True) -> dict[str, Tensor]:
        """Model inputs of the prompts (``with_answer``: followed by the answer and ``<eos>``), right-padded."""
        texts = [e.prompt + (f" {e.answer} <eos>" if with_answer else "") for e in examples]
        images = [e.image for e in examples if e.image is not None]
        videos = [e.video for e in examples if e.video is not None]
        return build_qwen_inputs(tokenizer, texts, images=images, videos=videos, padding_side="right", **self.input_kwargs)

    def encode(self, examples: list[Example], tokenizer: Any) -> tuple[dict[str, Tensor], Tensor]:
        inputs = self.inputs(examples, tokenizer)
        lengths = [len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) + 1 for e in examples]
        return inputs, answer_mask(inputs["attention_mask"], lengths)

    def prompt_inputs(self, examples: list[Example], tokenizer: Any) -> dict[str, Tensor]:
        """Inputs of the prompts alone, left-padded so position -1 is where every answer starts."""
        texts = [e.prompt for e in examples]
        images = [e.image for e in examples if e.image is not None]
        videos = [e.video for e in examples if e.video is not None]
        return build_qwen_inputs(tokenizer, texts, images=images, videos=videos, padding_side="left", **self.input_kwargs)
