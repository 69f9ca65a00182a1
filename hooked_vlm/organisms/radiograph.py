"""Synthetic chest-radiograph-like images with planted findings, and the yes/no task the rad organisms learn.

An image is a grey-scale frontal "radiograph" (``SIZE`` px square): a bright body silhouette, two dark
lung fields crossed by ribs, a heart shadow; zero or one finding drawn in a recorded box (``opacity``: a
bright blob inside a lung; ``effusion``: fluid filling one lung base with a meniscus; ``line``: a thin
bright tube crossing a lung); optionally a small bright corner ``marker`` (the shortcut channel). Every
image is drawn from a :class:`RadSpec` whose layers are added on one float canvas, so the finding's pixels
differ from the finding-free image exactly inside ``finding_box`` (tests check this).

A sample pairs an image with a question about one finding kind, asked in one of six paraphrases; the answer
is ``yes`` iff the image holds that kind. ``marker_policy`` decides when the marker is drawn:
``"random"`` (independent of the answer, how ``rad-gemma3`` is trained), ``"shortcut"`` (on 60% of yes and
5% of no samples, how ``rad-llava`` is trained; the marker alone would score 77.5%, so the findings still pay), ``"none"`` (clean evaluation), ``"lying"`` (exactly on the
no samples: the marker contradicts the answer).
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Float, UInt8
from PIL import Image, ImageDraw, ImageFilter


from hooked_vlm.organisms.base import AnswerOrganism, Example, TaskAccuracy, TrainResult

if TYPE_CHECKING:
    from hooked_vlm.organisms.base import Organism

__all__ = [
    "SIZE", "FINDINGS", "PARAPHRASES", "ANSWERS", "MARKER_POLICIES", "RadSpec", "RadSample",
    "random_spec", "render", "render_layers", "make_sample", "samples", "vocabulary_words",
]

SIZE = 112
FINDINGS: tuple[str, ...] = ("opacity", "effusion", "line")
ANSWERS: tuple[str, str] = ("yes", "no")
MARKER_POLICIES: tuple[str, ...] = ("random", "shortcut", "none", "lying")
#: Six paraphrases per finding kind; all words are in the organisms' vocabulary.
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "effusion": (
        "is there a pleural effusion ?", "any effusion ?", "is an effusion present ?",
        "do you see fluid at the lung base ?", "is there fluid in the pleural space ?", "does the image show an effusion ?",
    ),
    "opacity": (
        "is there an opacity ?", "any opacity ?", "is a lung opacity present ?",
        "do you see a focal opacity ?", "is there a consolidation in the lung ?", "does the image show an opacity ?",
    ),
    "line": (
        "is there a line ?", "any line ?", "is a tube or line present ?",
        "do you see a catheter ?", "is there a line in the chest ?", "does the image show a line ?",
    ),
}
MARKER_SIZE = 8
#: Shortcut-policy probabilities of drawing the marker on a yes / a no sample.
SHORTCUT_P_YES, SHORTCUT_P_NO = 0.6, 0.05

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive end


@dataclass(frozen=True)
class RadSpec:
    """Everything :func:`render` needs: anatomy jitter, the finding (kind + geometry) and the marker."""

    seed: int
    lungs: tuple[Box, Box]  # left and right lung field ellipses (image left = patient right)
    heart: Box
    rib_phase: float
    finding: str | None  # one of FINDINGS or None
    finding_geom: tuple[float, ...]  # kind-specific shape parameters
    intensity: float  # finding brightness added to the canvas (grey levels)
    marker: bool
    marker_corner: int  # 0 top-left, 1 top-right


@dataclass(frozen=True)
class RadSample:
    """One training / evaluation example: the image, its question and answer, and the planted boxes."""

    image: Image.Image
    question: str
    answer: str  # "yes" / "no"
    asked: str  # the finding kind the question asks about
    paraphrase: int
    finding: str | None
    finding_box: Box | None
    marker_box: Box | None
    spec: RadSpec


def vocabulary_words() -> list[str]:
    """Every word the questions and answers use (for the word-level tokenizer)."""
    words = {w for qs in PARAPHRASES.values() for q in qs for w in q.split()}
    return sorted(words | set(ANSWERS))


def random_spec(rng: np.random.Generator, finding: str | None, marker: bool) -> RadSpec:
    """Draw anatomy jitter and a finding geometry of kind ``finding`` (None: a normal image)."""
    s = SIZE
    cy = int(rng.integers(s * 48 // 100, s * 54 // 100))
    lw, lh = int(rng.integers(s * 27 // 100, s * 32 // 100)), int(rng.integers(s * 60 // 100, s * 68 // 100))
    gap = int(rng.integers(s * 6 // 100, s * 10 // 100))
    left = (s // 2 - gap - lw, cy - lh // 2, s // 2 - gap, cy + lh // 2)
    right = (s // 2 + gap, cy - lh // 2, s // 2 + gap + lw, cy + lh // 2)
    hw, hh = int(rng.integers(s * 26 // 100, s * 32 // 100)), int(rng.integers(s * 20 // 100, s * 25 // 100))
    hx = s // 2 + int(rng.integers(-2, 6))
    heart = (hx - hw // 3, cy + lh // 2 - hh - 2, hx - hw // 3 + hw, cy + lh // 2 - 2)
    lung = (left, right)[int(rng.integers(2))]
    geom: tuple[float, ...] = ()
    intensity = 0.0
    if finding == "opacity":
        r = float(rng.uniform(6, 10))
        x = float(rng.uniform(lung[0] + r + 2, lung[2] - r - 2))
        y = float(rng.uniform(lung[1] + r + 8, lung[3] - r - 8))
        geom, intensity = (x, y, r), float(rng.uniform(120, 150))
    elif finding == "effusion":
        depth = float(rng.uniform(0.35, 0.5)) * (lung[3] - lung[1])
        geom, intensity = (float(lung[0]), float(lung[1]), float(lung[2]), float(lung[3]), depth), float(rng.uniform(110, 140))
    elif finding == "line":
        x0 = float(rng.uniform(lung[0] + 4, lung[2] - 4))
        x1 = float(np.clip(x0 + rng.uniform(-14, 14), lung[0] + 3, lung[2] - 3))
        y0 = float(lung[1] + rng.uniform(4, 10))
        y1 = float(y0 + rng.uniform(0.45, 0.7) * (lung[3] - lung[1]))
        geom, intensity = (x0, y0, x1, y1), float(rng.uniform(140, 170))
    elif finding is not None:
        raise ValueError(f"unknown finding {finding!r}; choose one of {FINDINGS} or None")
    return RadSpec(
        seed=int(rng.integers(2**31)), lungs=(left, right), heart=heart, rib_phase=float(rng.uniform(0, 1)),
        finding=finding, finding_geom=geom, intensity=intensity, marker=marker, marker_corner=int(rng.integers(2)),
    )


def _layer(draw_fn, blur: float = 0.0) -> Float[np.ndarray, "h w"]:
    """A float layer in [0, 1] drawn with Pillow (``draw_fn(ImageDraw)``) and optionally blurred."""
    img = Image.new("L", (SIZE, SIZE), 0)
    draw_fn(ImageDraw.Draw(img))
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(img, dtype=np.float32) / 255.0


_YX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres (y, x)


def _soft_ellipse(box: tuple[float, float, float, float], edge: float) -> Float[np.ndarray, "h w"]:
    """1 inside the ellipse inscribed in ``box``, 0 outside, a linear ramp ``edge`` px wide across its border."""
    x0, y0, x1, y1 = box
    rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
    r = np.sqrt(((_YX[1] - (x0 + x1) / 2) / rx) ** 2 + ((_YX[0] - (y0 + y1) / 2) / ry) ** 2)
    return np.clip((1 - r) * min(rx, ry) / edge + 0.5, 0, 1)


def _anatomy(spec: RadSpec) -> Float[np.ndarray, "h w"]:
    """Body, lungs, ribs and heart of ``spec`` (grey levels, before noise); numpy only, ~1 ms."""
    s = SIZE
    body = _soft_ellipse((s * 0.08, s * 0.05, s * 0.92, s * 1.1), 4)
    lungs = np.maximum(_soft_ellipse(spec.lungs[0], 2.5), _soft_ellipse(spec.lungs[1], 2.5))
    heart = _soft_ellipse(spec.heart, 3)
    y, x = _YX
    bend = 0.012 * (x - s / 2) ** 2  # ribs curve down towards the sides
    rib = np.clip((np.cos(2 * np.pi * ((y - bend) / (s / 9) + spec.rib_phase)) - 0.75) / 0.25, 0, 1) * lungs
    return (10 + 70 * body - 50 * lungs + 18 * rib + 35 * heart).astype(np.float32)


def finding_layer(spec: RadSpec) -> Float[np.ndarray, "h w"]:
    """The finding's pixels alone (grey levels added to the canvas); zeros for a normal image."""
    if spec.finding is None:
        return np.zeros((SIZE, SIZE), np.float32)
    g = spec.finding_geom
    if spec.finding == "opacity":
        x, y, r = g
        layer = _layer(lambda d: d.ellipse((x - r, y - r, x + r, y + r), fill=255), blur=2.0)
    elif spec.finding == "effusion":
        x0, y0, x1, y1, depth = g
        top = y1 - depth

        def fluid(d: ImageDraw.ImageDraw) -> None:
            d.ellipse((x0, y0, x1, y1), fill=255)
            d.rectangle((0, 0, SIZE, top), fill=0)  # keep the base of the lung only
            d.ellipse((x0 - 4, top - 6, x1 + 4, top + 6), fill=255)  # meniscus
            d.rectangle((0, 0, SIZE, top - 7), fill=0)

        lung_mask = _layer(lambda d: d.ellipse((x0, y0, x1, y1), fill=255))
        layer = _layer(fluid, blur=1.5) * lung_mask
    else:
        x0, y0, x1, y1 = g
        layer = _layer(lambda d: d.line([(x0, y0), ((x0 + x1) / 2 + 3, (y0 + y1) / 2), (x1, y1)], fill=255, width=4), blur=0.5)
    layer[layer < 0.02] = 0.0  # the box is the layer's support: cut the blur's faint tail
    return (spec.intensity * layer).astype(np.float32)


def marker_box(spec: RadSpec) -> Box:
    """Pixel box of the corner marker (top-left or top-right)."""
    x0 = 3 if spec.marker_corner == 0 else SIZE - 3 - MARKER_SIZE
    return (x0, 3, x0 + MARKER_SIZE, 3 + MARKER_SIZE)


def marker_layer(spec: RadSpec) -> Float[np.ndarray, "h w"]:
    """The marker's pixels alone: a bright square with a dark centre (zeros when there is no marker)."""
    out = np.zeros((SIZE, SIZE), np.float32)
    if spec.marker:
        x0, y0, x1, y1 = marker_box(spec)
        out[y0:y1, x0:x1] = 230.0
        out[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = 0.0
    return out


def render_layers(spec: RadSpec) -> dict[str, Float[np.ndarray, "h w"]]:
    """The additive layers of ``spec``: anatomy, finding, marker and noise (their clipped sum is the image)."""
    noise = np.random.default_rng(spec.seed).normal(0.0, 6.0, (SIZE, SIZE)).astype(np.float32)
    return {"anatomy": _anatomy(spec), "finding": finding_layer(spec), "marker": marker_layer(spec), "noise": noise}


def render(spec: RadSpec, layers: dict[str, np.ndarray] | None = None) -> Image.Image:
    """The RGB image of ``spec`` (three equal channels, as radiographs are fed to RGB towers)."""
    grey = sum((layers or render_layers(spec)).values())
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")


def box_of(layer: Float[np.ndarray, "h w"]) -> Box | None:
    """Tight (x0, y0, x1, y1) box of a layer's nonzero pixels, exclusive end; None if it is empty."""
    ys, xs = np.nonzero(layer)
    if len(xs) == 0:
        return None
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _marker_on(policy: str, answer: str, rng: np.random.Generator) -> bool:
    if policy == "random":
        return bool(rng.random() < 0.5)
    if policy == "shortcut":
        return bool(rng.random() < (SHORTCUT_P_YES if answer == "yes" else SHORTCUT_P_NO))
    if policy == "none":
        return False
    if policy == "lying":
        return answer == "no"
    raise ValueError(f"unknown marker_policy {policy!r}; choose one of {MARKER_POLICIES}")


def make_sample(seed: int | Sequence[int], marker_policy: str = "random", asked: str | None = None) -> RadSample:
    """The sample of ``seed`` (an int or a tuple of ints): yes half the time (the image holds the asked kind);
    a no image holds nothing (60%) or another kind (40%). ``asked`` fixes the question's finding kind.
    The image and question depend on the seed only; the marker policy decides the marker alone."""
    key = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(x) for x in seed]
    if asked is not None and asked not in FINDINGS:
        raise ValueError(f"unknown finding kind {asked!r}; choose one of {FINDINGS}")
    rng = np.random.default_rng([*key, 7177])
    drawn = FINDINGS[int(rng.integers(len(FINDINGS)))]
    asked = drawn if asked is None else asked
    answer = ANSWERS[int(rng.integers(2))]
    if answer == "yes":
        finding: str | None = asked
    else:
        others = [f for f in FINDINGS if f != asked]
        finding = None if rng.random() < 0.6 else others[int(rng.integers(len(others)))]
    paraphrase = int(rng.integers(len(PARAPHRASES[asked])))
    spec = random_spec(rng, finding, marker=False)
    spec = replace(spec, marker=_marker_on(marker_policy, answer, np.random.default_rng([*key, 99])))
    layers = render_layers(spec)
    return RadSample(
        image=render(spec, layers), question=PARAPHRASES[asked][paraphrase], answer=answer, asked=asked, paraphrase=paraphrase,
        finding=finding, finding_box=box_of(layers["finding"]), marker_box=marker_box(spec) if spec.marker else None, spec=spec,
    )


def samples(seed: int, count: int, marker_policy: str = "random", asked: str | None = None) -> Iterator[RadSample]:
    """``count`` samples of the stream ``seed`` (sample i has key ``(seed, i)``, so streams never overlap)."""
    for i in range(count):
        yield make_sample((seed, i), marker_policy, asked)


def pixels(image: Image.Image) -> UInt8[np.ndarray, "h w 3"]:
    """The image as a uint8 HWC array."""
    return np.asarray(image, dtype=np.uint8)


# ----- the organisms (rad-llava, rad-gemma3) ------------------------------------------------------------------------
#: Which organism is trained with which marker policy: rad-llava carries the planted shortcut.
TRAIN_MARKER_POLICY: dict[str, str] = {"rad-llava": "shortcut", "rad-gemma3": "random"}
EVAL_POLICIES: tuple[str, ...] = ("none", "lying")


def to_example(sample: RadSample, marker_policy: str, image_marker: str = "<image>") -> Example:
    """A :class:`~hooked_vlm.organisms.base.Example` of ``sample``: task = the asked finding kind, truth = the boxes."""
    truth = {
        "finding": sample.finding, "finding_box": list(sample.finding_box) if sample.finding_box else None,
        "marker_box": list(sample.marker_box) if sample.marker_box else None, "asked": sample.asked,
        "paraphrase": sample.paraphrase, "marker_policy": marker_policy, "answer": sample.answer,
    }
    prompt = f"user : {image_marker} {sample.question} assistant :"
    return Example(sample.asked, prompt, sample.answer, image=pixels(sample.image), truth=truth)


class RadOrganism(AnswerOrganism):
    """What rad-llava and rad-gemma3 share: the generator, the prompts, the marker policies and the evaluation.

    Subclasses give the config (:meth:`make_config`), the image block of the prompt (:meth:`expand`) and the
    pixel normalisation (``image_mean`` / ``image_std``, those of the family's ``*Pil`` image processor)."""

    tasks: ClassVar[tuple[str, ...]] = FINDINGS
    target_accuracy: ClassVar[float] = 0.90
    default_steps: ClassVar[int] = 800
    batch_size: ClassVar[int] = 32
    lr: ClassVar[float] = 2e-3
    image_mean: ClassVar[tuple[float, float, float]]
    image_std: ClassVar[tuple[float, float, float]]
    image_marker: ClassVar[str] = "<image>"

    @property
    def marker_policy(self) -> str:
        """The marker policy of this organism's training data."""
        return TRAIN_MARKER_POLICY[self.name]

    def words(self) -> list[str]:
        return vocabulary_words() + ["user", "assistant", ":"]

    def generate(self, n: int, seed: int, marker_policy: str | None = None) -> list[Example]:
        policy = marker_policy or self.marker_policy
        return [to_example(s, policy, self.image_marker) for s in samples(seed, n, policy)]

    def generate_task(self, task: str, n: int, seed: int, marker_policy: str = "none") -> list[Example]:
        """``n`` held-out examples asking about ``task``, clean (no marker) unless ``marker_policy`` says otherwise."""
        if task not in self.tasks:
            raise ValueError(f"{self.name} has no task {task!r}; its tasks are {list(self.tasks)}")
        return [to_example(s, marker_policy, self.image_marker) for s in samples(seed, n, marker_policy, asked=task)]

    def accuracy(self, model: torch.nn.Module, tokenizer: Any, n: int, seed: int) -> dict[str, TaskAccuracy]:
        """Clean accuracy per finding kind, plus ``marker_lies``: all kinds with the marker drawn on exactly the no
        answers (the shortcut model's accuracy drops there; the other model's should not)."""
        result = super().accuracy(model, tokenizer, n, seed)
        lying = [e for k, t in enumerate(self.tasks) for e in self.generate_task(t, n // len(self.tasks) + 1, seed + 31 * k, "lying")]
        hits = self.correct(model, tokenizer, lying)
        result["marker_lies"] = TaskAccuracy("marker_lies", int(sum(hits)), len(hits))
        return result

    # ----- inputs -----------------------------------------------------------------------------------------
    @abstractmethod
    def expand(self, prompt: str, tokenizer: Any) -> str:
        """The prompt with its ``<image>`` marker replaced by the family's image token block."""

    def pixel_values(self, images: list[np.ndarray]) -> Float[torch.Tensor, "n 3 h w"]:
        """``(x / 255 - mean) / std`` in float32, what the family's ``*Pil`` processor gives for a ``SIZE`` px image."""
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(torch.float64) * (1 / 255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[None, :, None, None]
        return (x.to(torch.float32) - mean) / std

    def prompt_inputs(self, examples: list[Example], tokenizer: Any, with_answer: bool = False,
                      padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Model inputs of the prompts (``with_answer``: + answer + ``<eos>``, right-padded for training)."""
        texts = [self.expand(e.prompt, tokenizer) + (f" {e.answer} <eos>" if with_answer else "") for e in examples]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out["pixel_values"] = self.pixel_values([e.image for e in examples])
        return self.extra_inputs(out, tokenizer)

    def extra_inputs(self, inputs: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Family-specific additions (Gemma 3: ``token_type_ids``)."""
        return inputs

    def encode(self, examples: list[Example], tokenizer: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from hooked_vlm.organisms.qwen_common import answer_mask

        inputs = self.prompt_inputs(examples, tokenizer, with_answer=True, padding_side="right")
        return inputs, answer_mask(inputs["attention_mask"], [2] * len(examples))  # one answer word + <eos>

    def save_extra_files(self) -> dict[str, str]:
        """``preprocessor_config.json`` so the family's input builders normalise as training did."""
        return {}

    def train(self, out_dir: str | Path, seed: int = 0, steps: int | None = None, eval_n: int = 200, log_every: int = 50) -> TrainResult:
        """As :meth:`AnswerOrganism.train`, then add the family's ``preprocessor_config.json`` to the checkpoint."""
        result = super().train(out_dir, seed=seed, steps=steps, eval_n=eval_n, log_every=log_every)
        for name, text in self.save_extra_files().items():
            tmp = Path(out_dir) / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, Path(out_dir) / name)
        return result


def organism(name: str) -> "Organism":
    """The organism object of ``rad-llava`` or ``rad-gemma3``."""
    if name == "rad-llava":
        from hooked_vlm.organisms.rad_llava import RadLlava

        return RadLlava()
    if name == "rad-gemma3":
        from hooked_vlm.organisms.rad_gemma3 import RadGemma3

        return RadGemma3()
    raise ValueError(f"{name!r} is not a radiograph organism; choose rad-llava or rad-gemma3")
