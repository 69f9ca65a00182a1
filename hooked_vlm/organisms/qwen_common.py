"""What the Qwen organisms share: special tokens, the Qwen input builder, the answer mask, training-only token heads.

Token heads (``TokenHead``) are linear probes on the language model's hidden state at every visual token
(or, ``at="answer"``, at the position that predicts the answer), trained beside the answer loss and dropped
before saving: they give the vision tower and the first
LM blocks a dense, per-token gradient (this cell holds a green circle; this token is the one the question
names). Without them the answer loss is the only signal, and with ~95% of the visual tokens identical
background a tiny model sits at the answer prior for thousands of steps (docs/organisms.md, Training status).
The saved checkpoint is the plain transformers model; nothing of the heads ships.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vlm.inputs import build_qwen_inputs
from hooked_vlm.organisms.base import EVAL_SEED, AnswerOrganism, Example, TrainResult

__all__ = ["IGNORE", "QWEN_SPECIALS", "QwenAnswerOrganism", "TokenHead", "TokenHeads", "answer_mask"]

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


#: token-head label of a visual token that the head does not score (cross-entropy ``ignore_index``)
IGNORE = -100


@dataclass(frozen=True)
class TokenHead:
    """A training-only probe: predicts ``name`` from LM hidden state ``layer`` (0 = LM input) at every visual token,
    or (``at="answer"``) at the one position of each example that predicts its first answer token."""

    name: str
    layer: int
    classes: int  # 1: regression target (mean squared error); otherwise the number of classes (cross-entropy)
    weight: float = 1.0
    class_weight: tuple[float, ...] | None = None  # for rare classes (e.g. the one target cell among 100)
    at: str = "visual"  # "visual": labels [batch, visual tokens]; "answer": labels [batch], IGNORE where it does not apply
    regression: bool = False  # ``classes`` outputs regressed at once (labels [..., classes]; NaN: no target there)


class TokenHeads(torch.nn.Module):
    """The model plus its training-only token heads; ``loss`` adds the heads' losses to the answer loss."""

    def __init__(self, model: torch.nn.Module, heads: tuple[TokenHead, ...], visual_token_ids: list[int]) -> None:
        super().__init__()
        self.model = model
        self.specs = heads
        self.visual_token_ids = visual_token_ids
        width = model.config.get_text_config().hidden_size
        self.heads = torch.nn.ModuleDict({h.name: torch.nn.Linear(width, h.classes) for h in heads})

    def loss(self, inputs: dict[str, Tensor], answer: Tensor, labels: dict[str, Int[Tensor, "batch visual"]]) -> tuple[Tensor, dict[str, float]]:
        """Answer loss + weighted token-head losses, and each part's value (for the log)."""
        from hooked_vlm.organisms.training import answer_loss

        out = self.model(**inputs, output_hidden_states=True)
        total = answer_loss(out.logits, inputs["input_ids"], answer)
        parts = {"answer": float(total.detach())}
        visual = torch.isin(inputs["input_ids"], torch.tensor(self.visual_token_ids))
        # the position that predicts each example's first answer token (the answer mask's first position - 1)
        before_answer = answer.float().argmax(1) - 1
        rows = torch.arange(answer.shape[0])
        at_answer: dict[int, Tensor] = {}  # one gather per layer, shared by the heads that read it
        for spec in self.specs:
            if spec.at == "answer":
                if spec.layer not in at_answer:
                    at_answer[spec.layer] = out.hidden_states[spec.layer][rows, before_answer]
                hidden = at_answer[spec.layer]
            elif spec.at == "visual":
                hidden = out.hidden_states[spec.layer][visual]  # row-major over the batch: example, then token
            else:
                raise ValueError(f"token head {spec.name!r}: at={spec.at!r}; use 'visual' or 'answer'")
            target = labels[spec.name].reshape(-1, spec.classes) if spec.regression else labels[spec.name].flatten()
            if hidden.shape[0] != target.shape[0]:
                raise ValueError(f"token head {spec.name!r}: {target.shape[0]} labels for {hidden.shape[0]} {spec.at} positions")
            pred = self.heads[spec.name](hidden)
            if spec.regression:  # mean squared error over the known targets only
                known = ~torch.isnan(target)
                mask = known.float()
                part = ((pred - torch.where(known, target, torch.zeros_like(target))) ** 2 * mask).sum() / mask.sum().clamp(min=1)
            elif spec.classes == 1:
                part = torch.nn.functional.mse_loss(pred.squeeze(-1), target.float())
            elif not bool((target != IGNORE).any()):  # nothing to score in this batch (cross-entropy would be nan)
                part = pred.sum() * 0.0
            else:
                weight = torch.tensor(spec.class_weight) if spec.class_weight else None
                part = torch.nn.functional.cross_entropy(pred, target.long(), weight=weight, ignore_index=IGNORE)
            parts[spec.name] = float(part.detach())
            total = total + spec.weight * part
        return total, parts


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

    # ----- training with token heads ------------------------------------------------------------
    #: training-only probes on the visual tokens (empty: train on the answer loss alone)
    token_heads: ClassVar[tuple[TokenHead, ...]] = ()
    #: attention implementation during training ("eager" or "sdpa"); part of the recipe, since it changes the rounding
    train_attention: ClassVar[str] = "eager"
    #: build training batches in a worker process (the second core); the batches, and so the run, are unchanged
    prefetch: ClassVar[bool] = False
    #: run the tower's patch-embedding Conv3d as the equal linear map while training (faster on CPU; changes the rounding)
    train_patch_linear: ClassVar[bool] = False

    def token_labels(self, examples: list[Example]) -> dict[str, Tensor]:
        """Per visual token targets of every ``token_heads`` entry, ``[batch, visual tokens]`` in the model's token order."""
        raise NotImplementedError(f"{self.name} declares token heads but no token_labels()")

    def train(self, out_dir: str | Path, seed: int = 0, steps: int | None = None, eval_n: int = 200, log_every: int = 50,
              time_budget_s: float | None = None) -> TrainResult:
        """Train with the answer loss plus the training-only token heads (dropped before saving)."""
        if not self.token_heads:
            return super().train(out_dir, seed, steps, eval_n, log_every, time_budget_s)
        from hooked_vlm.organisms.saving import qwen_preprocessor_files, save_checkpoint
        from hooked_vlm.organisms.training import linear_patch_embedding, train_loop

        steps = self.default_steps if steps is None else steps
        tokenizer = self.tokenizer()
        visual_ids = [tokenizer.convert_tokens_to_ids(self.special_tokens[k]) for k in ("image_token", "video_token")]
        model = self.build_model(seed)
        # the attention implementation training runs (SDPA is faster on CPU, the same function); the saved config
        # loads with eager either way
        for config in (model.config, model.config.vision_config, model.config.text_config):
            config._attn_implementation = self.train_attention
        wrapped = TokenHeads(model, self.token_heads, visual_ids)

        def batch(step: int) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
            examples = self.training_examples(step, seed)
            inputs, mask = self.encode(examples, tokenizer)
            return inputs, mask, self.token_labels(examples)

        def loss_fn(m: TokenHeads, b: tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]) -> Tensor:
            return m.loss(*b)[0]

        start = time.perf_counter()
        with linear_patch_embedding(model) if self.train_patch_linear else contextlib.nullcontext():
            losses = train_loop(wrapped, batch, loss_fn, steps, lr=self.lr, weight_decay=self.weight_decay,
                                warmup_steps=min(self.warmup_steps, max(1, steps // 10)), seed=seed, log_every=log_every,
                                time_budget_s=time_budget_s, prefetch=self.prefetch)
        seconds = time.perf_counter() - start
        model = wrapped.model.eval()
        accuracy = self.accuracy(model, tokenizer, eval_n, EVAL_SEED) if eval_n else {}
        result = TrainResult(str(out_dir), len(losses), seconds, losses, accuracy)
        # the pixel limits and frame rate it was trained with, so a model loaded from the folder by path gets the same inputs
        save_checkpoint(self, model, tokenizer, out_dir, result, seed,
                        extra_files=qwen_preprocessor_files(model.config, self.input_kwargs))
        return result
