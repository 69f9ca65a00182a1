"""The organism contract: a small VLM of a real architecture, trained here on a task with planted ground truth.

An *organism* is a synthetic task plus the recipe that trains a tiny model of a real transformers
architecture on it, so that interpretability methods can be checked against a known answer (which
cell holds the target, which frames carry the motion, ...). This module holds what every organism
shares; one module per organism (``grid_qwen.py``, ``video_qwen.py``, ``shapes_clip.py``,
``radiograph.py``) implements the rest. The registry in ``hooked_vlm/organisms/__init__.py`` maps
names to modules; each module exposes ``organism(name) -> Organism``.

Stable API (other organism modules build on it)
    ``Example(task, prompt, answer, image=None, video=None, truth={})``
        One generated sample: the prompt (with ``<image>`` / ``<video>`` markers where the pixels
        go), the answer words, the pixels (uint8 ``(H, W, 3)`` image or ``(T, H, W, 3)`` video), and
        ``truth``: the planted ground truth as JSON-friendly values (cells, boxes, frame spans).
    ``Organism`` (abstract): class attributes ``name``, ``family`` (HF ``model_type``),
        ``architecture`` (HF class name), ``tasks``, ``target_accuracy``, ``default_steps``,
        ``summary`` / ``planted_truth`` (model-card text); methods ``generate(n, seed)``,
        ``make_config()``, ``words()``, ``train(out_dir, seed=0, steps=None) -> TrainResult``,
        ``evaluate(model_dir, n=200, seed=EVAL_SEED) -> dict[task, TaskAccuracy]``.
    ``AnswerOrganism(Organism)``: ready ``train`` / ``evaluate`` for decoder VLMs that answer in
        words; ``training_examples(step, seed)`` is one training batch (override it for a task mix that
        changes with the step). A subclass gives ``generate``, ``make_config``, ``words`` and
        ``encode(examples, tokenizer) -> (inputs, answer_mask)``: model keyword tensors of
        "prompt + answer + <eos>" (right-padded) and a bool ``[B, L]`` mask that is True on the
        answer and ``<eos>`` tokens. The loss is next-token cross-entropy on those tokens; an answer
        counts as correct when every one of them is the argmax given the tokens before it (exactly
        what greedy decoding would produce), so evaluation takes one forward per batch.
    ``TaskAccuracy(task, correct, n)``: ``accuracy`` and a 95% Wilson interval (``ci_low``,
        ``ci_high``; statsmodels ``proportion_confint``).
    ``TrainResult``: steps, wall seconds, the loss curve, accuracy per task.
    Helpers: ``build_word_tokenizer`` (``hooked_vlm.organisms.tokenizer``), ``train_loop`` and
        ``answer_loss`` (``hooked_vlm.organisms.training``), ``save_checkpoint`` / ``model_card``
        (``hooked_vlm.organisms.saving``).

Registry (``hooked_vlm/organisms/__init__.py``): ``ORGANISMS`` (name -> module), ``list_organisms()``,
``get_organism(name)``, ``checkpoint_dir(name)`` (``hooked_vlm/organisms/checkpoints/<name>/``, package data),
``is_trained(name)``. ``save_checkpoint(organism, model, tokenizer, out_dir, result, seed, extra_files=None)``
writes config.json, model.safetensors, generation_config.json, tokenizer.json + tokenizer_config.json,
README.md (model card from ``summary`` / ``planted_truth`` / measured accuracy) and ``organism.json``
(accuracy per task, steps, seconds; ``hooked-vlm models`` reads it). ``hooked-vlm organisms train|eval|list``
(``hooked_vlm/organisms/cli.py``) calls ``train(out_dir, seed, steps, eval_n=...)`` and ``evaluate``, so an
organism that does not subclass ``AnswerOrganism`` must accept ``eval_n`` in ``train`` and return a
``TrainResult``. ``HookedVLM.from_pretrained(name)`` loads a shipped organism and sets ``model.tokenizer``.

Speed: on a shared 2-core machine run training with ``torch.set_num_threads(1)`` (``--threads 1``); two
threads under contention were measured ~10x slower per step than one.

Seeds: training draws examples from ``seed`` onwards; evaluation uses ``EVAL_SEED`` (disjoint
generator streams), so the held-out images were never trained on.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EVAL_SEED",
    "VALIDATION_SEED",
    "training_stream",
    "Example",
    "TaskAccuracy",
    "TrainResult",
    "Organism",
    "AnswerOrganism",
    "wilson_interval",
    "accuracy_table",
]

#: Seed of the held-out evaluation stream. Training batch ``step`` of seed ``s`` is drawn from ``training_stream(s, step)``,
#: so seed 1's batch 3 starts with the first presence example of this stream (one example in a run of 2,400 batches).
EVAL_SEED = 1_000_003
#: Seed of the validation stream on which a recipe's training seed is chosen, so the accuracy measured on EVAL_SEED is
#: not selected on; its per-task streams (``+ 104729 * task``) meet no training stream of fewer than 90,000 steps.
VALIDATION_SEED = 777_777


def training_stream(seed: int, step: int) -> int:
    """The generator seed of training batch ``step`` of run ``seed``: one stream per run and step (see EVAL_SEED)."""
    return seed * 1_000_000 + step


@dataclass
class Example:
    """One generated sample with its planted ground truth."""

    task: str
    prompt: str
    answer: str
    image: np.ndarray | None = None
    video: np.ndarray | None = None
    truth: dict[str, Any] = field(default_factory=dict)


def wilson_interval(correct: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (statsmodels), the honest CI at small n and near 0 or 1."""
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        raise ValueError(f"an accuracy needs at least one example, got n={n}")
    low, high = proportion_confint(correct, n, alpha=alpha, method="wilson")
    return float(low), float(high)


@dataclass
class TaskAccuracy:
    """Accuracy of one task on ``n`` held-out examples with a 95% Wilson interval."""

    task: str
    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.ci
        return {"task": self.task, "correct": self.correct, "n": self.n, "accuracy": self.accuracy, "ci_low": low, "ci_high": high}


def accuracy_table(accuracies: dict[str, TaskAccuracy]) -> str:
    """Markdown table of per-task accuracies with their intervals."""
    rows = ["| task | accuracy | 95% CI (Wilson) | n |", "|---|---|---|---|"]
    for acc in accuracies.values():
        low, high = acc.ci
        rows.append(f"| {acc.task} | {acc.accuracy:.3f} | [{low:.3f}, {high:.3f}] | {acc.n} |")
    return "\n".join(rows)


@dataclass
class TrainResult:
    """What a training run did: steps, wall time, loss curve and held-out accuracy per task."""

    out_dir: str
    steps: int
    seconds: float
    losses: list[float]
    accuracy: dict[str, TaskAccuracy] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["accuracy"] = {k: v.to_dict() for k, v in self.accuracy.items()}
        return out


class Organism(ABC):
    """A synthetic task with planted ground truth and the recipe that trains a tiny real-architecture VLM on it."""

    name: ClassVar[str]
    family: ClassVar[str]  # HF model_type, e.g. "qwen2_5_vl"
    architecture: ClassVar[str]  # HF class name, e.g. "Qwen2_5_VLForConditionalGeneration"
    tasks: ClassVar[tuple[str, ...]]
    target_accuracy: ClassVar[float]
    default_steps: ClassVar[int]
    #: the training seed of the shipped checkpoint (``organisms train`` uses it unless ``--seed`` is given)
    recipe_seed: ClassVar[int] = 0
    summary: ClassVar[str] = ""
    planted_truth: ClassVar[str] = ""

    @abstractmethod
    def generate(self, n: int, seed: int) -> list[Example]:
        """``n`` examples drawn deterministically from ``seed`` (tasks interleaved)."""

    @abstractmethod
    def make_config(self) -> Any:
        """The transformers config of the organism's model (a real family config)."""

    @abstractmethod
    def words(self) -> list[str]:
        """Every word the prompts and answers use (the word-level vocabulary)."""

    @abstractmethod
    def train(self, out_dir: str | Path, seed: int = 0, steps: int | None = None) -> TrainResult:
        """Train from scratch and save a Hugging Face-layout checkpoint (with model card) in ``out_dir``."""

    @abstractmethod
    def evaluate(self, model_dir: str | Path, n: int = 200, seed: int = EVAL_SEED) -> dict[str, TaskAccuracy]:
        """Accuracy per task on ``n`` freshly generated held-out examples per task."""

    def generate_task(self, task: str, n: int, seed: int) -> list[Example]:
        """``n`` examples of one task (default: filter a larger interleaved draw)."""
        if task not in self.tasks:
            raise ValueError(f"{self.name} has no task {task!r}; its tasks are {list(self.tasks)}")
        out: list[Example] = []
        chunk = 0
        while len(out) < n:
            out.extend(e for e in self.generate(n * len(self.tasks), seed + 7919 * chunk) if e.task == task)
            chunk += 1
        return out[:n]


class AnswerOrganism(Organism):
    """Decoder VLM that answers in words: next-token loss on the answer, exact-match accuracy."""

    batch_size: ClassVar[int] = 32
    lr: ClassVar[float] = 3e-3
    weight_decay: ClassVar[float] = 0.01
    warmup_steps: ClassVar[int] = 50
    eval_batch_size: ClassVar[int] = 50
    #: special tokens of the tokenizer (before the words) and their ``extra_special_tokens`` roles
    special_tokens: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def encode(self, examples: list[Example], tokenizer: Any) -> tuple[dict[str, Tensor], Tensor]:
        """Model inputs of "prompt + answer + <eos>" (right-padded) and the ``[B, L]`` answer mask."""

    # ----- model and tokenizer ---------------------------------------------------------------------
    def tokenizer(self) -> Any:
        from hooked_vlm.organisms.tokenizer import build_word_tokenizer

        return build_word_tokenizer(self.words(), self.special_tokens)

    def build_model(self, seed: int) -> torch.nn.Module:
        """A freshly initialised transformers model of ``make_config()`` (fp32, eager attention)."""
        import transformers

        config = self.make_config()
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        return getattr(transformers, self.architecture)(config).float()

    def load(self, model_dir: str | Path) -> tuple[torch.nn.Module, Any]:
        """The trained transformers model (eval mode, fp32) and its tokenizer from a checkpoint folder."""
        import transformers
        from transformers import AutoTokenizer

        model_dir = _checked_dir(model_dir)
        model = getattr(transformers, self.architecture).from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(model_dir)

    # ----- training --------------------------------------------------------------------------------
    def training_examples(self, step: int, seed: int) -> list[Example]:
        """The examples of training step ``step`` of run ``seed`` (drawn from ``training_stream(seed, step)``)."""
        return self.generate(self.batch_size, training_stream(seed, step))

    def train(self, out_dir: str | Path, seed: int = 0, steps: int | None = None, eval_n: int = 200, log_every: int = 50,
              time_budget_s: float | None = None) -> TrainResult:
        from hooked_vlm.organisms.saving import save_checkpoint
        from hooked_vlm.organisms.training import answer_loss, train_loop

        steps = self.default_steps if steps is None else steps
        tokenizer = self.tokenizer()
        model = self.build_model(seed)

        def batch(step: int) -> tuple[dict[str, Tensor], Tensor]:
            return self.encode(self.training_examples(step, seed), tokenizer)

        def loss_fn(m: torch.nn.Module, b: tuple[dict[str, Tensor], Tensor]) -> Tensor:
            inputs, mask = b
            return answer_loss(m(**inputs).logits, inputs["input_ids"], mask)

        start = time.perf_counter()
        losses = train_loop(model, batch, loss_fn, steps, lr=self.lr, weight_decay=self.weight_decay,
                            warmup_steps=min(self.warmup_steps, max(1, steps // 10)), seed=seed, log_every=log_every,
                            time_budget_s=time_budget_s)
        seconds = time.perf_counter() - start
        steps = len(losses)
        model.eval()
        accuracy = self.accuracy(model, tokenizer, eval_n, EVAL_SEED) if eval_n else {}
        result = TrainResult(str(out_dir), steps, seconds, losses, accuracy)
        save_checkpoint(self, model, tokenizer, out_dir, result, seed)
        return result

    # ----- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def correct(self, model: torch.nn.Module, tokenizer: Any, examples: list[Example]) -> list[bool]:
        """Whether greedy decoding reproduces each example's answer (+ <eos>), from one teacher-forced forward."""
        out: list[bool] = []
        for i in range(0, len(examples), self.eval_batch_size):
            inputs, mask = self.encode(examples[i : i + self.eval_batch_size], tokenizer)
            logits = model(**inputs).logits
            out.extend(answer_matches(logits, inputs["input_ids"], mask).tolist())
        return out

    def accuracy(self, model: torch.nn.Module, tokenizer: Any, n: int, seed: int) -> dict[str, TaskAccuracy]:
        result: dict[str, TaskAccuracy] = {}
        for k, task in enumerate(self.tasks):
            examples = self.generate_task(task, n, seed + 104729 * k)
            hits = self.correct(model, tokenizer, examples)
            result[task] = TaskAccuracy(task, int(sum(hits)), len(hits))
        return result

    def evaluate(self, model_dir: str | Path, n: int = 200, seed: int = EVAL_SEED) -> dict[str, TaskAccuracy]:
        model, tokenizer = self.load(model_dir)
        return self.accuracy(model, tokenizer, n, seed)


def answer_matches(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """``[B]`` bool: every answer token is the argmax of the logits one position earlier."""
    pred = logits[:, :-1].argmax(-1)
    target = input_ids[:, 1:]
    mask = answer_mask[:, 1:]
    return ((pred == target) | ~mask).all(-1)


def _checked_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a trained organism checkpoint (no config.json); train one with "
            "`hooked-vlm organisms train NAME --out DIR` or pass the folder of a shipped organism"
        )
    return path


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """The ``organism.json`` a checkpoint folder carries (accuracy, training time), or {}."""
    path = Path(model_dir) / "organism.json"
    return json.loads(path.read_text()) if path.is_file() else {}
