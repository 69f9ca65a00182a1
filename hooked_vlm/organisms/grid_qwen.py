"""``grid-qwen2.5-vl``: visual search and spatial relations on a 10x10 grid of shapes (Qwen2.5-VL, window attention).

Images are 280x280: a 10x10 grid of 28-px cells, so one cell is exactly one merged visual token of
Qwen2.5-VL (token ``k`` = cell ``(k // 10, k % 10)``; /work/shared/notes/hf-reference-models.md §8).
Each image holds 1-5 shapes (circle / square / triangle / cross x red / green / blue / yellow / purple),
each centred in its own cell. The background of cell (r, c) is a flat light tint
``(190 + 6c, 190 + 6r, 220)``: every cell token therefore carries its own coordinates in its content, the
way a photo's layout does; a tiny model trained for minutes reads location from this rather than
having to derive absolute position from relative rotary angles.

The question comes before the image (``"is there a green circle ? <image>"``, answer after
``<|vision_end|>``), so every visual token can read the question through causal attention and mark
itself as a match; with the image first, a tiny model sat at chance for 300 steps (it must first
gather the question at the last token and only then search).

Tasks (question -> answer):

* ``presence``: "is there a green circle ?" -> yes / no
* ``location``: "where is the green circle ?" -> "row three column five" (rows and columns 0-9 as words)
* ``counting``: "how many circles are there ?" / "how many red shapes are there ?" -> zero .. three
* ``relation``: "is the red square left of the blue circle ?" (left of / right of / above / below) -> yes / no

Planted truth (``example.truth``): every object's colour, shape, row and column; ``target_cells`` (the
cells of the named objects; for counting the matching cells); the answer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from hooked_vlm.organisms.base import Example, training_stream
from hooked_vlm.organisms.drawing import SHAPES, draw_shape
from hooked_vlm.organisms.qwen_common import IGNORE, QwenAnswerOrganism, TokenHead

__all__ = ["GridOrganism", "organism", "COLORS", "SHAPES", "NUMBER_WORDS", "CELL", "GRID", "render", "cell_background",
           "relation_word", "relation_distance"]

CELL, GRID = 28, 10
SIZE = CELL * GRID
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 200),
}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = ("left", "right", "above", "below")
#: a cell's role in the question (the role token heads' classes) and their loss weights
ROLES = ("background", "other", "named", "second")
ROLE_WEIGHTS = (0.05, 1.0, 1.0, 1.0)
MARGIN = 4  # shapes fill the cell minus this margin on every side


def cell_background(row: int, col: int) -> tuple[int, int, int]:
    """Background colour of cell (row, col): a flat tint that encodes the cell's coordinates."""
    return (190 + 6 * col, 190 + 6 * row, 220)


def draw_shape_in_cell(draw: ImageDraw.ImageDraw, shape: str, color: tuple[int, int, int], row: int, col: int) -> None:
    """Draw one shape centred in cell (row, col), MARGIN pixels from the cell's edges."""
    box = (col * CELL + MARGIN, row * CELL + MARGIN, (col + 1) * CELL - MARGIN - 1, (row + 1) * CELL - MARGIN - 1)
    draw_shape(draw, shape, color, box)


def render(objects: list[dict[str, Any]]) -> np.ndarray:
    """The 280x280 RGB uint8 image of ``objects`` (dicts with color, shape, row, col)."""
    bg = np.zeros((SIZE, SIZE, 3), np.uint8)
    for r in range(GRID):
        for c in range(GRID):
            bg[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = cell_background(r, c)
    image = Image.fromarray(bg)
    draw = ImageDraw.Draw(image)
    for o in objects:
        draw_shape_in_cell(draw, o["shape"], COLORS[o["color"]], o["row"], o["col"])
    return np.asarray(image).copy()


def relation_word(example: Example) -> str:
    """The relation a relation question asks about (one of RELATIONS), read from its prompt."""
    return next(r for r in RELATIONS if r in example.prompt.split())


def relation_distance(example: Example) -> int:
    """How many cells apart a relation question's two named objects are along the asked axis (columns for left / right)."""
    (row_a, col_a), (row_b, col_b) = example.truth["target_cells"]
    return abs(col_a - col_b) if relation_word(example) in ("left", "right") else abs(row_a - row_b)


def _kinds() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


class GridOrganism(QwenAnswerOrganism):
    name: ClassVar[str] = "grid-qwen2.5-vl"
    family: ClassVar[str] = "qwen2_5_vl"
    architecture: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    tasks: ClassVar[tuple[str, ...]] = ("presence", "location", "counting", "relation")
    target_accuracy: ClassVar[float] = 0.95
    default_steps: ClassVar[int] = 2400
    #: the best of seeds 0-2 (session i11u, on the EVAL_SEED stream; its unselected accuracy on base.VALIDATION_SEED data
    #: is in docs/organisms.md, session i11w). Seeds 0 and 2 of today's recipe miss location (docs/organisms.md, i11x)
    recipe_seed: ClassVar[int] = 1
    batch_size: ClassVar[int] = 16
    #: a "near relation" training example has its two objects at most this many cells apart along the asked axis
    NEAR_CELLS: ClassVar[int] = 3
    #: (first step, task cycle) of the training batches; "near relation" draws relation examples until one is near.
    #: Balanced until the features are bound to the question (~step 900), then one extra close-pair relation per
    #: cycle: relations 0.83 -> 0.985 with the other tasks >= 0.975 (session i11x, docs/organisms.md)
    training_mix: ClassVar[tuple[tuple[int, tuple[str, ...]], ...]] = ((0, tasks), (1200, tasks + ("near relation",)))
    #: what the training-only kinds of ``training_mix`` are (for the model card)
    training_task_notes: ClassVar[dict[str, str]] = {
        "near relation": f"a relation question whose two objects are 1-{NEAR_CELLS} cells apart along the asked axis"}
    lr: ClassVar[float] = 3e-3
    train_attention: ClassVar[str] = "sdpa"
    prefetch: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "Visual search and spatial relations. 280x280 images, a 10x10 grid of 28-px cells (one cell = one merged "
        "Qwen2.5-VL visual token), 1-5 shapes (circle / square / triangle / cross x red / green / blue / yellow / "
        "purple), each centred in its own cell on a flat cell-specific background tint (190 + 6 col, 190 + 6 row, 220). "
        "Questions: presence (\"is there a green circle ?\" -> yes/no), location (\"where is the green circle ?\" -> "
        "\"row three column five\"), counting (\"how many circles are there ?\" -> zero..three) and relations "
        "(\"is the red square left of the blue circle ?\" -> yes/no; left of / right of / above / below)."
    )
    planted_truth: ClassVar[str] = (
        "For every image, the colour, shape and cell of each object (`truth['objects']`) and the cells of the named "
        "objects (`truth['target_cells']`). The answer depends only on those cells: a presence / location answer is "
        "carried by the one visual token of the target's cell (sequence position `first_image_pad + 10*row + col`); "
        "a relation answer by the two named objects' tokens; a count by the matching objects' tokens."
    )

    # ----- model ---------------------------------------------------------------------------------
    def words(self) -> list[str]:
        fixed = ["is", "there", "a", "the", "where", "how", "many", "are", "shapes", "of", "yes", "no", "row", "column", "?"]
        return fixed + list(NUMBER_WORDS) + list(COLORS) + list(SHAPES) + list(PLURAL.values()) + list(RELATIONS)

    def make_config(self) -> Any:
        from transformers import Qwen2_5_VLConfig

        vocab = 4 + len(self.special_tokens) + len(self.words())
        # head_dim 24 -> 12 rotary pairs split T/H/W 4/4/4; vision block 0 windowed (112 px = 4x4 cells), block 1 full
        text = dict(vocab_size=-(-vocab // 16) * 16, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                    bos_token_id=0, eos_token_id=1, pad_token_id=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4]})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=96, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        tok = self.tokenizer()
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in self.special_tokens.items()}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_token"],
                                video_token_id=ids["video_token"], vision_start_token_id=ids["vision_start_token"],
                                vision_end_token_id=ids["vision_end_token"], tie_word_embeddings=False)

    # ----- training-only token heads ----------------------------------------------------------------
    # what each cell holds (colour, shape) and where it is (row, column) at the LM input; the cell's role in the
    # question after LM blocks 0 and 1, over ALL cells: 0 background, 1 an object the question does not name,
    # 2 the target / a counted object / the relation's first object, 3 the relation's second object (background
    # weighted 0.05, so the loss is about the objects). Scoring the role on object cells only left it undefined on
    # the 95 background cells, so the answer could not read "named" as a clean key (docs/organisms.md, session
    # i11s). Dropped before saving (qwen_common.TokenHead). After block 0 every cell also classifies its own row and column (10 classes
    # each): the regression target at the LM input is one scalar, which the answer would have to cut into ten words;
    # as classes, the named cell's row / column word is one linear read away.
    CELL_HEADS: ClassVar[tuple[TokenHead, ...]] = (
        TokenHead("color", 0, 1 + len(COLORS)),
        TokenHead("shape", 0, 1 + len(SHAPES)),
        TokenHead("row", 0, 1, weight=2.0),
        TokenHead("col", 0, 1, weight=2.0),
        TokenHead("role_1", 1, len(ROLES), class_weight=ROLE_WEIGHTS),
        TokenHead("role_2", 2, len(ROLES), class_weight=ROLE_WEIGHTS),
        TokenHead("row_class", 1, GRID),
        TokenHead("col_class", 1, GRID),
    )
    #: the answer-position heads (session i11u's run "A1", docs/organisms.md): after block 1, at the position that
    #: predicts the answer, the relation word (relation questions), the count (counting) and the named objects' rows /
    #: columns (relations: both objects; location: the target). They lifted counting from 0.63 to 0.98 and relations
    #: from 0.57 to 0.83 (seed 1).
    ANSWER_HEADS: ClassVar[tuple[TokenHead, ...]] = (
        TokenHead("answer_relation", 2, len(RELATIONS), weight=0.5, at="answer"),
        TokenHead("answer_count", 2, 4, weight=0.5, at="answer"),
        TokenHead("answer_coords", 2, 4, weight=0.5, at="answer", regression=True),
    )
    token_heads: ClassVar[tuple[TokenHead, ...]] = CELL_HEADS + ANSWER_HEADS

    def token_labels(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Per cell token (row-major, token k = cell (k // 10, k % 10)): colour, shape, row, column and role; per example the answer-position targets."""
        n, cells = len(examples), GRID * GRID
        color, shape, role = (torch.zeros(n, cells, dtype=torch.long) for _ in range(3))
        for b, ex in enumerate(examples):
            for o in ex.truth["objects"]:
                k = o["row"] * GRID + o["col"]
                color[b, k] = 1 + list(COLORS).index(o["color"])
                shape[b, k] = 1 + SHAPES.index(o["shape"])
                role[b, k] = ROLES.index("other")
            for j, (r, c) in enumerate(ex.truth["target_cells"]):
                second = ex.task == "relation" and j == 1
                role[b, r * GRID + c] = ROLES.index("second" if second else "named")
        k = torch.arange(cells)
        row = (k // GRID).float() / ((GRID - 1) / 2) - 1  # -1 .. 1
        col = (k % GRID).float() / ((GRID - 1) / 2) - 1
        count = torch.tensor([len(ex.truth["target_cells"]) if ex.task == "counting" else IGNORE for ex in examples])
        relation = torch.tensor([RELATIONS.index(relation_word(ex)) if ex.task == "relation" else IGNORE for ex in examples])
        coords = torch.full((n, 4), float("nan"))  # named objects' (row, col, second row, second col), scaled to -1 .. 1
        for b, ex in enumerate(examples):
            if ex.task in ("relation", "location"):
                flat = [v for cell in ex.truth["target_cells"] for v in cell]
                coords[b, :len(flat)] = torch.tensor(flat) / ((GRID - 1) / 2) - 1
        return {"color": color, "shape": shape, "row": row.expand(n, cells), "col": col.expand(n, cells),
                "role_1": role, "role_2": role,
                "row_class": (k // GRID).expand(n, cells), "col_class": (k % GRID).expand(n, cells), "answer_relation": relation, "answer_count": count, "answer_coords": coords}

    # ----- data ----------------------------------------------------------------------------------
    def generate(self, n: int, seed: int) -> list[Example]:
        return self._generate_cycle(self.tasks, n, seed)

    def training_examples(self, step: int, seed: int) -> list[Example]:
        """A training batch whose task mix follows ``training_mix`` at ``step``."""
        cycle = [tasks for first_step, tasks in self.training_mix if step >= first_step][-1]
        return self._generate_cycle(cycle, self.batch_size, training_stream(seed, step))

    def _generate_cycle(self, cycle: tuple[str, ...], n: int, seed: int) -> list[Example]:
        """``n`` examples from one seeded stream, their tasks cycling through ``cycle``."""
        rng = np.random.default_rng(seed)
        makers = {"presence": self._presence, "location": self._location, "counting": self._counting, "relation": self._relation,
                  "near relation": self._near_relation}
        return [makers[cycle[i % len(cycle)]](rng) for i in range(n)]

    def _near_relation(self, rng: np.random.Generator) -> Example:
        """A relation example whose objects are at most ``NEAR_CELLS`` apart along the asked axis (the hard cases)."""
        if self.NEAR_CELLS < 1:  # the two objects always differ along the asked axis: no example would ever qualify
            raise ValueError(f"NEAR_CELLS must be at least 1 (cells apart along the asked axis), got {self.NEAR_CELLS}")
        while True:
            example = self._relation(rng)
            if relation_distance(example) <= self.NEAR_CELLS:
                return example

    def generate_task(self, task: str, n: int, seed: int) -> list[Example]:
        if task not in self.tasks:
            raise ValueError(f"{self.name} has no task {task!r}; its tasks are {list(self.tasks)}")
        rng = np.random.default_rng(seed)
        maker = getattr(self, f"_{task}")
        return [maker(rng) for _ in range(n)]

    @staticmethod
    def _cells(rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
        flat = rng.choice(GRID * GRID, size=k, replace=False)
        return [(int(f) // GRID, int(f) % GRID) for f in flat]

    @staticmethod
    def _objects(kinds: list[tuple[str, str]], cells: list[tuple[int, int]]) -> list[dict[str, Any]]:
        return [{"color": c, "shape": s, "row": r, "col": q} for (c, s), (r, q) in zip(kinds, cells)]

    @staticmethod
    def _distractors(rng: np.random.Generator, k: int, exclude: set[tuple[str, str]]) -> list[tuple[str, str]]:
        pool = [kd for kd in _kinds() if kd not in exclude]
        return [pool[int(i)] for i in rng.integers(0, len(pool), size=k)]

    def _example(self, task: str, prompt: str, answer: str, objects: list[dict[str, Any]], targets: list[dict[str, Any]]) -> Example:
        truth = {"objects": objects, "target_cells": [[o["row"], o["col"]] for o in targets], "answer": answer}
        return Example(task, prompt + " <image>", answer, image=render(objects), truth=truth)

    def _presence(self, rng: np.random.Generator) -> Example:
        kinds = _kinds()
        target = kinds[int(rng.integers(len(kinds)))]
        present = bool(rng.integers(2))
        n_other = int(rng.integers(0 if present else 1, 5))
        # hard negatives: distractors often share the target's colour or shape
        near = [kd for kd in kinds if kd != target and (kd[0] == target[0] or kd[1] == target[1])]
        others = [near[int(rng.integers(len(near)))] if rng.random() < 0.5 else kd
                  for kd in self._distractors(rng, n_other, {target})]
        chosen = ([target] if present else []) + others
        cells = self._cells(rng, len(chosen))
        objects = self._objects(chosen, cells)
        targets = objects[:1] if present else []
        perm = rng.permutation(len(objects))
        objects = [objects[int(i)] for i in perm]
        return self._example("presence", f"is there a {target[0]} {target[1]} ?", "yes" if present else "no", objects, targets)

    def _location(self, rng: np.random.Generator) -> Example:
        kinds = _kinds()
        target = kinds[int(rng.integers(len(kinds)))]
        chosen = [target] + self._distractors(rng, int(rng.integers(0, 5)), {target})
        objects = self._objects(chosen, self._cells(rng, len(chosen)))
        t = objects[0]
        answer = f"row {NUMBER_WORDS[t['row']]} column {NUMBER_WORDS[t['col']]}"
        perm = rng.permutation(len(objects))
        return self._example("location", f"where is the {target[0]} {target[1]} ?", answer, [objects[int(i)] for i in perm], [t])

    def _counting(self, rng: np.random.Generator) -> Example:
        by_color = bool(rng.integers(2))
        attr = list(COLORS)[int(rng.integers(len(COLORS)))] if by_color else SHAPES[int(rng.integers(len(SHAPES)))]
        match = [kd for kd in _kinds() if kd[0 if by_color else 1] == attr]
        other = [kd for kd in _kinds() if kd[0 if by_color else 1] != attr]
        count = int(rng.integers(0, 4))
        n_other = int(rng.integers(1 if count == 0 else 0, 5 - count + 1))
        chosen = [match[int(i)] for i in rng.integers(0, len(match), size=count)]
        chosen += [other[int(i)] for i in rng.integers(0, len(other), size=n_other)]
        objects = self._objects(chosen, self._cells(rng, len(chosen)))
        targets = objects[:count]
        perm = rng.permutation(len(objects))
        prompt = f"how many {attr} shapes are there ?" if by_color else f"how many {PLURAL[attr]} are there ?"
        return self._example("counting", prompt, NUMBER_WORDS[count], [objects[int(i)] for i in perm], targets)

    def _relation(self, rng: np.random.Generator) -> Example:
        kinds = _kinds()
        a_i, b_i = rng.choice(len(kinds), size=2, replace=False)
        a, b = kinds[int(a_i)], kinds[int(b_i)]
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        want_yes = bool(rng.integers(2))
        axis = "col" if relation in ("left", "right") else "row"
        while True:  # two cells that differ along the asked axis
            (ra, ca), (rb, cb) = self._cells(rng, 2)
            if (ca if axis == "col" else ra) != (cb if axis == "col" else rb):
                break
        va, vb = (ca, cb) if axis == "col" else (ra, rb)
        holds = va < vb if relation in ("left", "above") else va > vb
        if holds != want_yes:  # swap the two objects' cells
            (ra, ca), (rb, cb) = (rb, cb), (ra, ca)
        objects = self._objects([a, b], [(ra, ca), (rb, cb)])
        used = {(ra, ca), (rb, cb)}
        free = [c for c in self._cells(rng, 7) if c not in used]
        extra = self._distractors(rng, int(rng.integers(0, 4)), {a, b})
        objects += self._objects(extra, free[: len(extra)])
        phrase = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[relation]
        prompt = f"is the {a[0]} {a[1]} {phrase} the {b[0]} {b[1]} ?"
        targets = objects[:2]
        perm = rng.permutation(len(objects))
        return self._example("relation", prompt, "yes" if want_yes else "no", [objects[int(i)] for i in perm], targets)


def organism(name: str = "grid-qwen2.5-vl") -> GridOrganism:
    if name != GridOrganism.name:
        raise ValueError(f"{__name__} implements {GridOrganism.name!r}, not {name!r}")
    return GridOrganism()
