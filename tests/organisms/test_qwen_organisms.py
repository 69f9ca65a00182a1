"""The Qwen model organisms: generators, shipped checkpoints (both libraries agree), accuracy, training, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hooked_vlm.organisms import ORGANISMS, checkpoint_dir, get_organism, is_trained, list_organisms
from hooked_vlm.organisms.grid_qwen import CELL, COLORS, GRID, NUMBER_WORDS, PLURAL
from hooked_vlm.organisms.video_qwen import BACKGROUND, DIRECTIONS, FRAMES, SHAPE_SIZE

QWEN = ("grid-qwen2.5-vl", "video-qwen2-vl")


# ----------------------------------------------------------------------------- registry and tokenizer
def test_registry_names_all_five_organisms():
    assert list_organisms() == ["grid-qwen2.5-vl", "video-qwen2-vl", "shapes-clip", "rad-llava", "rad-gemma3"]
    assert checkpoint_dir("grid-qwen2.5-vl").parts[-3:] == ("organisms", "checkpoints", "grid-qwen2.5-vl")


def test_unknown_organism_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown organism 'grid-qwen'.*Did you mean grid-qwen2.5-vl"):
        get_organism("grid-qwen")


def test_word_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    from hooked_vlm.organisms.qwen_common import QWEN_SPECIALS
    from hooked_vlm.organisms.tokenizer import build_word_tokenizer

    build_word_tokenizer(["is", "there", "a", "red", "circle", "?"], QWEN_SPECIALS).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    # layout by hand: 4 base specials, the 4 Qwen specials in order, then the words
    expected = [0, 6, 4, 4, 7, 8, 9, 10, 11, 12, 13]
    assert tok("<|vision_start|><|image_pad|><|image_pad|><|vision_end|> Is there a red circle ?")["input_ids"] == expected
    assert (tok.image_token, tok.image_token_id, tok.video_token_id) == ("<|image_pad|>", 4, 5)
    with pytest.raises(ValueError, match="must be distinct"):
        build_word_tokenizer(["red", "red"])


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", QWEN)
def test_generator_is_deterministic_per_seed(name):
    org = get_organism(name)
    a, b, c = org.generate(6, seed=11), org.generate(6, seed=11), org.generate(6, seed=12)
    for x, y in zip(a, b):
        assert (x.task, x.prompt, x.answer, x.truth) == (y.task, y.prompt, y.answer, y.truth)
        assert np.array_equal(x.image if x.image is not None else x.video, y.image if y.image is not None else y.video)
    assert [x.truth for x in a] != [x.truth for x in c]


def _cell_colour(image: np.ndarray, row: int, col: int) -> tuple[int, ...]:
    """Colour at the centre of a cell (every shape covers its cell's centre pixel)."""
    return tuple(int(v) for v in image[row * CELL + CELL // 2, col * CELL + CELL // 2])


def _object_cells(image: np.ndarray) -> dict[tuple[int, int], str]:
    """Cells whose centre pixel has a palette colour, read from the pixels alone."""
    by_rgb = {rgb: name for name, rgb in COLORS.items()}
    out = {}
    for r in range(GRID):
        for c in range(GRID):
            colour = by_rgb.get(_cell_colour(image, r, c))
            if colour is not None:
                out[(r, c)] = colour
    return out


def test_grid_annotations_match_pixels():
    org = get_organism("grid-qwen2.5-vl")
    for ex in org.generate(80, seed=5):
        cells = _object_cells(ex.image)
        objects = ex.truth["objects"]
        assert 1 <= len(objects) <= 5
        assert cells == {(o["row"], o["col"]): o["color"] for o in objects}
        # a cell without an object is one flat colour (its background tint)
        for r in range(GRID):
            for c in range(GRID):
                if (r, c) not in cells:
                    block = ex.image[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL].reshape(-1, 3)
                    assert (block == block[0]).all()
        words = ex.prompt.split()
        if ex.task == "location":
            _, row, _, col = ex.answer.split()
            assert cells[(NUMBER_WORDS.index(row), NUMBER_WORDS.index(col))] == words[-4]
        elif ex.task == "counting":
            attr = words[2]
            if attr in COLORS:
                assert NUMBER_WORDS.index(ex.answer) == sum(v == attr for v in cells.values())
            else:
                shape = {p: s for s, p in PLURAL.items()}[attr]
                assert NUMBER_WORDS.index(ex.answer) == sum(o["shape"] == shape for o in objects)
        elif ex.task == "relation":  # "is the C1 S1 REL [of] the C2 S2 ? <image>"
            (ra, ca), (rb, cb) = ex.truth["target_cells"]
            assert (cells[(ra, ca)], cells[(rb, cb)]) == (words[2], words[-4])
            rel = words[4]
            holds = {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[rel]
            assert ex.answer == ("yes" if holds else "no")
        elif ex.task == "presence":
            colour, shape = words[3], words[4]
            present = any(o["color"] == colour and o["shape"] == shape for o in objects)
            assert ex.answer == ("yes" if present else "no")
            if present:
                (r, c), = ex.truth["target_cells"]
                assert cells[(r, c)] == colour


def test_video_annotations_match_pixels():
    org = get_organism("video-qwen2-vl")
    for ex in org.generate(30, seed=9):
        video = ex.video
        assert video.shape == (FRAMES, 112, 112, 3)
        shape_px = (video != np.array(BACKGROUND, np.uint8)).any(-1)  # [T, H, W] non-background
        for tr in ex.truth["tracks"]:
            for t, pos in enumerate(tr["positions"]):
                if pos is not None:  # the centre of the shape has the track's colour
                    x, y = pos
                    assert tuple(video[t, y + SHAPE_SIZE // 2, x + SHAPE_SIZE // 2]) == COLORS[tr["color"]]
        if ex.task == "direction":
            start, stop = ex.truth["answer_frames"]
            visible = shape_px.any((1, 2))
            assert visible.tolist() == [start <= t < stop for t in range(FRAMES)]
            ys, xs = zip(*[np.nonzero(shape_px[t]) for t in range(start, stop)])
            cx = np.array([x.mean() for x in xs])
            cy = np.array([y.mean() for y in ys])
            dx, dy = DIRECTIONS[ex.answer]
            moves = np.diff(cx) if dx else np.diff(cy)
            assert (np.sign(moves) == (dx or dy)).all()
            assert ex.truth["answer_slices"] == list(range(start // 2, stop // 2))
        elif ex.task == "order":
            first_seen = {}
            for tr in ex.truth["tracks"]:
                rgb = np.array(COLORS[tr["color"]], np.uint8)
                first_seen[tr["color"]] = int(np.argmax((video == rgb).all(-1).any((1, 2))))
            assert ex.answer == min(first_seen, key=first_seen.get)
        elif ex.task == "motion":
            still = all((video[t] == video[0]).all() for t in range(FRAMES))
            assert ex.answer == ("no" if still else "yes")


def test_video_motion_is_visible_within_each_temporal_slice():
    """The learnable cue: the two frames of a temporal slice show the moving shape >= 10 px apart (centroid of its pixels),
    and every direction clip leaves at least one slice empty, so frame-span methods have slices outside the span."""
    org = get_organism("video-qwen2-vl")
    for ex in org.generate(24, seed=11):
        if ex.task == "order":
            continue
        shape_px = (ex.video != np.array(BACKGROUND, np.uint8)).any(-1)
        shifts = []
        for s in range(FRAMES // 2):
            a, b = shape_px[2 * s], shape_px[2 * s + 1]
            if a.any() and b.any():
                (ya, xa), (yb, xb) = np.nonzero(a), np.nonzero(b)
                shifts.append(max(abs(xb.mean() - xa.mean()), abs(yb.mean() - ya.mean())))
        if ex.answer == "no":
            assert shifts == [0.0] * (FRAMES // 2)
        else:
            assert shifts and min(shifts) >= 10 - 1e-9, (ex.task, shifts)
        if ex.task == "direction":
            empty = [s for s in range(FRAMES // 2) if not shape_px[2 * s:2 * s + 2].any()]
            assert 1 <= len(empty) <= 2 and sorted(empty + ex.truth["answer_slices"]) == list(range(FRAMES // 2))


def test_encode_masks_exactly_the_answer():
    """encode() builds prompt + answer + <eos> with the library's own Qwen input builder; answers are masked."""
    org = get_organism("grid-qwen2.5-vl")
    tok = org.tokenizer()
    exs = org.generate(4, seed=1)
    inputs, mask = org.encode(exs, tok)
    for b, ex in enumerate(exs):
        answer_ids = tok(ex.answer + " <eos>", add_special_tokens=False)["input_ids"]
        assert inputs["input_ids"][b][mask[b]].tolist() == answer_ids


# ----------------------------------------------------------------------------- training code
@pytest.mark.slow
def test_thirty_training_steps_lower_the_loss():
    from hooked_vlm.organisms.training import answer_loss, train_loop

    org = get_organism("video-qwen2-vl")
    tok = org.tokenizer()
    model = org.build_model(seed=0)
    batches = [org.encode(org.generate(8, seed=s), tok) for s in range(3)]
    losses = train_loop(model, lambda step: batches[step % 3], lambda m, b: answer_loss(m(**b[0]).logits, b[0]["input_ids"], b[1]),
                        steps=30, lr=3e-3, warmup_steps=3, seed=0)
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


# ----------------------------------------------------------------------------- shipped checkpoints
def _shipped(name):
    if not is_trained(name):
        pytest.fail(f"{name} has no shipped checkpoint in {checkpoint_dir(name)}; train it with `hooked-vlm organisms train {name}`")
    return checkpoint_dir(name)


@pytest.fixture(scope="module")
def loaded():
    """name -> (organism, transformers model, hooked model); each loaded once."""
    from hooked_vlm import HookedVLM

    cache = {}

    def get(name):
        if name not in cache:
            org = get_organism(name)
            hf, _ = org.load(_shipped(name))
            cache[name] = (org, hf, HookedVLM.from_pretrained(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", QWEN)
def test_checkpoint_layout_and_size(name):
    folder = _shipped(name)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (folder / f).is_file(), f
    assert (folder / "model.safetensors").stat().st_size <= 10 * 2**20
    card = (folder / "README.md").read_text()
    meta = json.loads((folder / "organism.json").read_text())
    for task, acc in meta["accuracy"].items():
        assert f"| {task} | {acc['accuracy']:.3f} |" in card
    # the card says how it was trained: the generator's module and every training-only head, with its layer
    org = get_organism(name)
    assert f"`{ORGANISMS[name]}` — `organism(\"{name}\")" in card
    assert "answer tokens only" not in card
    for head in org.token_heads:
        assert f"{head.name} (layer {head.layer}, {head.at}, weight {head.weight:g})" in card


def test_model_card_of_a_subclass_run_as_a_script_names_the_registered_module():
    from hooked_vlm.organisms.grid_qwen import GridOrganism
    from hooked_vlm.organisms.saving import model_card

    variant = type("Variant", (GridOrganism,), {"__module__": "__main__", "token_heads": GridOrganism.CELL_HEADS})
    meta = {"parameters": 1, "seed": 3, "steps": 5, "train_seconds": 1.0, "torch_threads": 1, "load_average_at_save": None,
            "loss_first_50": 1.0, "loss_last_50": 0.5, "accuracy": {}}
    card = model_card(variant(), meta)
    assert "`hooked_vlm.organisms.grid_qwen` — " in card and "__main__" not in card
    assert "answer_coords" not in card and "role_2 (layer 2, visual, weight 1)" in card
    bare = type("Bare", (GridOrganism,), {"token_heads": ()})
    assert "loss on the answer tokens only." in model_card(bare(), meta)


def test_grid_training_batches_follow_the_task_mix_by_step():
    from collections import Counter

    from hooked_vlm.organisms.grid_qwen import GridOrganism

    tasks = GridOrganism.tasks
    phased = type("Phased", (GridOrganism,), {"training_mix": ((0, tasks), (7, tasks + ("relation", "relation")))})()
    early = phased.training_examples(6, seed=2)
    # before the second phase a batch is the balanced stream of that step, example for example
    assert [(e.task, e.prompt, e.answer) for e in early] == [(e.task, e.prompt, e.answer) for e in phased.generate(16, 2_000_006)]
    assert Counter(e.task for e in early) == {t: 4 for t in tasks}
    late = Counter(e.task for e in phased.training_examples(7, seed=2))
    assert late == {"presence": 3, "location": 3, "counting": 3, "relation": 7}  # a cycle of 6 over 16 examples
    meta = {"parameters": 1, "seed": 2, "steps": 9, "train_seconds": 1.0, "torch_threads": 1, "load_average_at_save": None,
            "loss_first_50": 1.0, "loss_last_50": 0.5, "accuracy": {}}
    from hooked_vlm.organisms.saving import model_card

    card = model_card(phased, meta)
    assert "from step 7: presence, location, counting, relation, relation, relation." in card
    assert "\"near relation\" is a relation question whose two objects are 1-3 cells apart along the asked axis." in model_card(
        GridOrganism(), meta)
    single = type("Single", (GridOrganism,), {"training_mix": ((0, tasks),)})()
    assert "Task mix" not in model_card(single, meta)


def test_grid_near_relation_examples_are_the_close_pairs_along_the_asked_axis():
    from hooked_vlm.organisms.grid_qwen import GridOrganism, relation_distance

    org = GridOrganism()
    near = org._generate_cycle(("near relation",), 40, seed=5)
    assert all(e.task == "relation" and relation_distance(e) <= org.NEAR_CELLS for e in near)
    assert {e.answer for e in near} == {"yes", "no"}
    plain = [relation_distance(e) for e in org.generate_task("relation", 200, seed=5)]
    assert max(plain) > org.NEAR_CELLS + 1  # the plain stream also holds far pairs
    touching = type("Touching", (GridOrganism,), {"NEAR_CELLS": 0})()
    with pytest.raises(ValueError, match="NEAR_CELLS must be at least 1"):
        touching._generate_cycle(("near relation",), 1, seed=5)
    for example in near:  # by hand: columns for left / right, rows for above / below
        (ra, ca), (rb, cb) = example.truth["target_cells"]
        across = any(w in example.prompt.split() for w in ("left", "right"))
        assert 1 <= (abs(ca - cb) if across else abs(ra - rb)) <= org.NEAR_CELLS


@pytest.mark.parametrize("name", QWEN)
def test_transformers_and_hooked_vlm_agree(loaded, name):
    org, hf, hooked = loaded(name)
    assert hooked.tokenizer.get_vocab() == org.tokenizer().get_vocab()
    inputs = org.prompt_inputs(org.generate(4, seed=77), hooked.tokenizer)
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = hooked(**inputs)
    assert ref.shape == ours.shape
    real = inputs["attention_mask"].bool()  # left padding: padded positions hold no prediction
    assert (ref - ours)[real].abs().max() <= 1e-4


# The targets; both shipped checkpoints meet them (grid, session i11x: 1.00 / 0.96 / 0.99 / 0.98 on n = 100;
# video, session i11v: 1.00 on every task). A task passes when its held-out accuracy on 200 fresh examples is
# consistent with the target (the Wilson 95% interval reaches it: 184 of 200 passes a 0.95 target, 183 does not).
# The former floor, target - 0.05 on 40 examples, let the old grid checkpoint's relations (0.83-0.84 on the
# evaluation and validation streams) through: they scored 0.93 on the first 100 examples of this stream.
TARGET = {"grid-qwen2.5-vl": 0.95, "video-qwen2-vl": 0.90}


@pytest.mark.slow
@pytest.mark.parametrize("name", QWEN)
def test_heldout_accuracy_reaches_the_target(loaded, name):
    from hooked_vlm.organisms.base import wilson_interval

    org, hf, _ = loaded(name)
    tok = org.tokenizer()
    below = {}
    for task in org.tasks:
        hits = org.correct(hf, tok, org.generate_task(task, 200, seed=424242))
        low, high = wilson_interval(int(sum(hits)), len(hits))
        if high < TARGET[name]:
            below[task] = (float(np.mean(hits)), round(high, 3))
    assert not below, f"below the {TARGET[name]} target (accuracy, Wilson upper bound): {below}"


# ----------------------------------------------------------------------------- loss and schedule
def test_answer_loss_scores_only_the_next_answer_tokens():
    from hooked_vlm.organisms.training import answer_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.tensor([[0, 3, 4, 5, 1], [0, 2, 6, 1, 2]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    # by hand: token t is predicted by the logits at t - 1
    terms = []
    for b, t in [(0, 3), (0, 4), (1, 2), (1, 3)]:
        terms.append(-(logits[b, t - 1].log_softmax(-1)[ids[b, t]]))
    assert torch.allclose(answer_loss(logits, ids, mask), torch.stack(terms).mean())
    with pytest.raises(ValueError, match="selects no token"):
        answer_loss(logits, ids, torch.zeros_like(mask))


def test_cosine_schedule_by_hand():
    from hooked_vlm.organisms.training import cosine_schedule

    assert cosine_schedule(0, 110, 10) == pytest.approx(0.1)
    assert cosine_schedule(9, 110, 10) == pytest.approx(1.0)
    assert cosine_schedule(60, 110, 10) == pytest.approx(0.5)  # half-way through the decay: (1 + cos(pi/2)) / 2
    assert cosine_schedule(110, 110, 10) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- command line
def test_models_command_lists_organisms_with_their_accuracy():
    import io

    from hooked_vlm.cli import main

    out = io.StringIO()
    assert main(["models"], stdout=out) == 0
    text = out.getvalue()
    for name in QWEN:
        meta = json.loads((_shipped(name) / "organism.json").read_text())
        row = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        for task, acc in meta["accuracy"].items():
            assert f"{task} {acc['accuracy']:.2f}" in row
    assert all(name in text for name in ORGANISMS)


def test_organisms_train_command_uses_the_recipe_seed_unless_told(tmp_path, monkeypatch):
    import io

    from hooked_vlm.cli import main
    from hooked_vlm.organisms.base import TrainResult
    from hooked_vlm.organisms.grid_qwen import GridOrganism

    seeds = []

    def fake_train(self, out_dir, seed=0, steps=None, eval_n=200, **kwargs):
        seeds.append(seed)
        return TrainResult(str(out_dir), 1, 0.1, [1.0], {})

    monkeypatch.setattr(GridOrganism, "train", fake_train)
    monkeypatch.setattr(GridOrganism, "recipe_seed", 7)
    assert main(["organisms", "train", "grid-qwen2.5-vl", "--out", str(tmp_path)], stdout=io.StringIO()) == 0
    assert main(["organisms", "train", "grid-qwen2.5-vl", "--out", str(tmp_path), "--seed", "0"], stdout=io.StringIO()) == 0
    assert seeds == [7, 0]


def test_organisms_eval_command_reports_wilson_intervals(tmp_path):
    import io

    from statsmodels.stats.proportion import proportion_confint

    from hooked_vlm.cli import main

    out = io.StringIO()
    assert main(["organisms", "eval", "video-qwen2-vl", "-n", "6", "--json"], stdout=out) == 0
    result = json.loads(out.getvalue())
    assert set(result) == {"direction", "order", "motion"}
    for r in result.values():
        low, high = proportion_confint(r["correct"], 6, method="wilson")
        assert (r["n"], r["ci_low"], r["ci_high"]) == (6, pytest.approx(low), pytest.approx(high))
