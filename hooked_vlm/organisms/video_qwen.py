"""``video-qwen2-vl``: video counterfactual tracing on clips of moving shapes (Qwen2-VL).

Clips are 8 frames of 112x112 (Qwen2-VL: 2 frames per temporal slice -> 4 slices of 4x4 merged tokens,
64 video tokens) on a plain grey background. A moving shape (16 px) jumps 10-13 px per frame, so the two frames
of every temporal patch differ in most of the pixels it covers: the direction is a feature of one temporal slice
(its two frames), which the patch embedding sees directly. Tasks (prompt -> answer):

* ``direction``: one shape is visible only during a slice-aligned span of 2-3 of the 4 slices, frames
  ``[start, stop)``, and moves 10-13 px per frame; "which way does the red circle move ?" -> left / right / up / down. The frames of
  the span carry the answer, the others are empty. Playing the clip backwards flips the answer.
* ``order``: two shapes of different colours appear (and stay, still) at frames on different slices;
  "which colour appears first ?" -> the colour. The answer is carried by the slices from the first
  appearance up to and including the second.
* ``motion``: one shape, present in every frame, either still or moving; "does the red circle move ?" -> yes / no.

Planted truth (``example.truth``): the per-frame position of every shape (``None`` where absent), the
answer span in frames and in slices (``answer_frames``, ``answer_slices``), the direction / appearance frames.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from hooked_vlm.organisms.base import Example
from hooked_vlm.organisms.drawing import SHAPES, draw_shape
from hooked_vlm.organisms.grid_qwen import COLORS
from hooked_vlm.organisms.qwen_common import QwenAnswerOrganism, TokenHead

__all__ = ["VideoOrganism", "organism", "render_clip", "DIRECTIONS", "OPPOSITE", "FRAMES", "SIZE", "SHAPE_SIZE", "BACKGROUND"]

FRAMES, SIZE, SHAPE_SIZE, TPS = 8, 112, 16, 2
MERGED = 28  # pixels per merged video token side (14-px patches, 2x2 merge)
BACKGROUND = (225, 225, 225)
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def render_clip(tracks: list[dict[str, Any]]) -> np.ndarray:
    """``(FRAMES, SIZE, SIZE, 3)`` uint8 clip; each track has color, shape and ``positions`` (per frame (x, y) or None)."""
    frames = []
    for t in range(FRAMES):
        image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for tr in tracks:
            pos = tr["positions"][t]
            if pos is not None:
                x, y = pos
                draw_shape(draw, tr["shape"], COLORS[tr["color"]], (x, y, x + SHAPE_SIZE - 1, y + SHAPE_SIZE - 1))
        frames.append(np.asarray(image))
    return np.stack(frames)


def _slices(frames: range | list[int]) -> list[int]:
    return sorted({f // TPS for f in frames})


class VideoOrganism(QwenAnswerOrganism):
    name: ClassVar[str] = "video-qwen2-vl"
    family: ClassVar[str] = "qwen2_vl"
    architecture: ClassVar[str] = "Qwen2VLForConditionalGeneration"
    tasks: ClassVar[tuple[str, ...]] = ("direction", "order", "motion")
    target_accuracy: ClassVar[float] = 0.90
    default_steps: ClassVar[int] = 2000
    batch_size: ClassVar[int] = 8
    lr: ClassVar[float] = 2e-3
    #: px per frame of a moving shape, [low, high): a 10-13 px jump between the two frames of a temporal patch, so that
    #: a 16 px shape's in-slice motion changes most of the pixels it covers (at 5-7 px the motion head stayed at chance)
    speeds: ClassVar[tuple[int, int]] = (10, 14)
    input_kwargs: ClassVar[dict[str, Any]] = {"video_min_pixels": 56 * 56, "video_max_pixels": 224 * 224, "fps": 2.0}
    summary: ClassVar[str] = (
        "Video counterfactual tracing. 8-frame 112x112 clips (4 Qwen2-VL temporal slices of 4x4 merged tokens) of one "
        "or two 16 px shapes on grey; a moving shape jumps 10-13 px per frame. Questions: direction (\"which way does the "
        "red circle move ?\" -> left/right/up/down; the shape is visible and moving only during a slice-aligned span of "
        "2-3 slices), order of appearance (\"which colour "
        "appears first ?\" -> colour) and motion (\"does the red circle move ?\" -> yes/no)."
    )
    planted_truth: ClassVar[str] = (
        "Per clip, every shape's position in every frame (`truth['tracks']`), and the frames and temporal slices that "
        "carry the answer (`truth['answer_frames']`, `truth['answer_slices']`): for direction the span in which the "
        "shape is visible, for order the slices from the first appearance to the second. Reversing a direction clip "
        "in time flips its answer (left <-> right, up <-> down)."
    )

    def words(self) -> list[str]:
        fixed = ["which", "way", "does", "the", "move", "colour", "appears", "first", "yes", "no", "?"]
        return fixed + list(DIRECTIONS) + list(COLORS) + list(SHAPES)

    def make_config(self) -> Any:
        from transformers import Qwen2VLConfig

        vocab = 4 + len(self.special_tokens) + len(self.words())
        # head_dim 24 -> 12 rotary pairs split T/H/W 4/4/4; vision attention is per temporal slice (Qwen2-VL)
        text = dict(vocab_size=-(-vocab // 16) * 16, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                    bos_token_id=0, eos_token_id=1, pad_token_id=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4]})
        vision = dict(depth=2, embed_dim=64, hidden_size=96, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=TPS, in_channels=3)
        tok = self.tokenizer()
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in self.special_tokens.items()}
        return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_token"],
                             video_token_id=ids["video_token"], vision_start_token_id=ids["vision_start_token"],
                             vision_end_token_id=ids["vision_end_token"], tie_word_embeddings=False)

    # ----- training-only token heads ----------------------------------------------------------------
    # per video token (temporal slice s, merged cell r, c): the colour of the shape it shows, and the direction the
    # shape moves within the slice (0: none / still). Dropped before saving (qwen_common.TokenHead).
    token_heads: ClassVar[tuple[TokenHead, ...]] = (
        TokenHead("color", 0, 1 + len(COLORS), class_weight=(1.0,) + (5.0,) * len(COLORS)),
        TokenHead("moving", 0, 1 + len(DIRECTIONS), class_weight=(1.0,) + (5.0,) * len(DIRECTIONS)),
        TokenHead("moving_1", 1, 1 + len(DIRECTIONS), class_weight=(1.0,) + (5.0,) * len(DIRECTIONS)),
        TokenHead("moving_2", 2, 1 + len(DIRECTIONS), class_weight=(1.0,) + (5.0,) * len(DIRECTIONS)),
    )

    def token_labels(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Per video token (slice-major, then merged rows and columns of 28 px): shape colour and in-slice motion."""
        side = SIZE // MERGED
        n_tokens = (FRAMES // TPS) * side * side
        color = torch.zeros(len(examples), n_tokens, dtype=torch.long)
        moving = torch.zeros(len(examples), n_tokens, dtype=torch.long)
        for b, ex in enumerate(examples):
            for tr in ex.truth["tracks"]:
                for s in range(FRAMES // TPS):
                    seen = [tr["positions"][t] for t in range(s * TPS, (s + 1) * TPS) if tr["positions"][t] is not None]
                    if not seen:
                        continue
                    step = (np.sign(seen[-1][0] - seen[0][0]), np.sign(seen[-1][1] - seen[0][1]))
                    direction = next((1 + i for i, d in enumerate(DIRECTIONS.values()) if d == step), 0)
                    for x, y in seen:
                        for r in range(y // MERGED, (y + SHAPE_SIZE - 1) // MERGED + 1):
                            for c in range(x // MERGED, (x + SHAPE_SIZE - 1) // MERGED + 1):
                                k = s * side * side + r * side + c
                                color[b, k] = 1 + list(COLORS).index(tr["color"])
                                moving[b, k] = max(int(moving[b, k]), direction)
        return {"color": color, "moving": moving, "moving_1": moving, "moving_2": moving}

    # ----- data ----------------------------------------------------------------------------------
    def generate(self, n: int, seed: int) -> list[Example]:
        rng = np.random.default_rng(seed)
        return [getattr(self, f"_{self.tasks[i % len(self.tasks)]}")(rng) for i in range(n)]

    def generate_task(self, task: str, n: int, seed: int) -> list[Example]:
        if task not in self.tasks:
            raise ValueError(f"{self.name} has no task {task!r}; its tasks are {list(self.tasks)}")
        rng = np.random.default_rng(seed)
        return [getattr(self, f"_{task}")(rng) for _ in range(n)]

    @staticmethod
    def _kind(rng: np.random.Generator, exclude_color: str | None = None) -> tuple[str, str]:
        colors = [c for c in COLORS if c != exclude_color]
        return colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))]

    @staticmethod
    def _path(rng: np.random.Generator, direction: str, frames: int, speed: int) -> list[tuple[int, int]]:
        """Top-left positions of a shape moving ``speed`` px/frame in ``direction`` for ``frames`` frames, inside the clip."""
        dx, dy = DIRECTIONS[direction]
        travel = speed * (frames - 1)
        lo, hi = 2, SIZE - SHAPE_SIZE - 2
        x0 = int(rng.integers(lo + (travel if dx < 0 else 0), hi - (travel if dx > 0 else 0) + 1))
        y0 = int(rng.integers(lo + (travel if dy < 0 else 0), hi - (travel if dy > 0 else 0) + 1))
        return [(x0 + dx * speed * t, y0 + dy * speed * t) for t in range(frames)]

    def direction_clip(self, color: str, shape: str, direction: str, start: int, stop: int, path: list[tuple[int, int]]) -> Example:
        """A direction example from explicit parameters (the validation builds counterfactuals with it)."""
        positions: list[Any] = [None] * FRAMES
        for t, p in zip(range(start, stop), path):
            positions[t] = p
        tracks = [{"color": color, "shape": shape, "positions": positions}]
        truth = {"tracks": tracks, "direction": direction, "answer_frames": [start, stop],
                 "answer_slices": _slices(range(start, stop)), "answer": direction}
        return Example("direction", f"<video> which way does the {color} {shape} move ?", direction,
                       video=render_clip(tracks), truth=truth)

    def _direction(self, rng: np.random.Generator) -> Example:
        color, shape = self._kind(rng)
        direction = list(DIRECTIONS)[int(rng.integers(4))]
        n_slices = FRAMES // TPS
        length = int(rng.integers(2, n_slices))  # 2-3 of the 4 slices, so every clip has empty slices outside its span
        first = int(rng.integers(0, n_slices - length + 1))
        start, stop = first * TPS, (first + length) * TPS
        speed = int(rng.integers(*self.speeds))
        return self.direction_clip(color, shape, direction, start, stop, self._path(rng, direction, stop - start, speed))

    def _order(self, rng: np.random.Generator) -> Example:
        ca, sa = self._kind(rng)
        cb, sb = self._kind(rng, exclude_color=ca)
        n_slices = FRAMES // TPS
        first, second = sorted(int(s) for s in rng.choice(n_slices, size=2, replace=False))
        while True:
            pa = (int(rng.integers(2, SIZE - SHAPE_SIZE - 2)), int(rng.integers(2, SIZE - SHAPE_SIZE - 2)))
            pb = (int(rng.integers(2, SIZE - SHAPE_SIZE - 2)), int(rng.integers(2, SIZE - SHAPE_SIZE - 2)))
            if abs(pa[0] - pb[0]) > SHAPE_SIZE or abs(pa[1] - pb[1]) > SHAPE_SIZE:
                break
        tracks = [
            {"color": ca, "shape": sa, "positions": [pa if t >= first * TPS else None for t in range(FRAMES)]},
            {"color": cb, "shape": sb, "positions": [pb if t >= second * TPS else None for t in range(FRAMES)]},
        ]
        if rng.integers(2):
            tracks = tracks[::-1]  # the first-listed track is not always the first to appear
        truth = {"tracks": tracks, "appear": {ca: first * TPS, cb: second * TPS},
                 "answer_frames": [first * TPS, (second + 1) * TPS], "answer_slices": list(range(first, second + 1)), "answer": ca}
        return Example("order", "<video> which colour appears first ?", ca, video=render_clip(tracks), truth=truth)

    def _motion(self, rng: np.random.Generator) -> Example:
        color, shape = self._kind(rng)
        moves = bool(rng.integers(2))
        if moves:
            direction = list(DIRECTIONS)[int(rng.integers(4))]
            path = self._path(rng, direction, FRAMES, int(rng.integers(*self.speeds)))
        else:
            direction = None
            p = (int(rng.integers(2, SIZE - SHAPE_SIZE - 2)), int(rng.integers(2, SIZE - SHAPE_SIZE - 2)))
            path = [p] * FRAMES
        tracks = [{"color": color, "shape": shape, "positions": path}]
        answer = "yes" if moves else "no"
        truth = {"tracks": tracks, "direction": direction, "answer_frames": [0, FRAMES],
                 "answer_slices": list(range(FRAMES // TPS)), "answer": answer}
        return Example("motion", f"<video> does the {color} {shape} move ?", answer, video=render_clip(tracks), truth=truth)


def organism(name: str = "video-qwen2-vl") -> VideoOrganism:
    if name != VideoOrganism.name:
        raise ValueError(f"{__name__} implements {VideoOrganism.name!r}, not {name!r}")
    return VideoOrganism()
