"""Training-only token heads of the Qwen organisms: labels match the pixels, the loss is the sum it claims."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm.organisms import get_organism
from hooked_vlm.organisms.grid_qwen import CELL, COLORS, GRID, NUMBER_WORDS, RELATIONS, ROLES
from hooked_vlm.organisms.qwen_common import IGNORE
from hooked_vlm.organisms.video_qwen import BACKGROUND, FRAMES, MERGED, SIZE, TPS


def test_grid_token_labels_match_the_pixels():
    org = get_organism("grid-qwen2.5-vl")
    exs = org.generate(12, seed=3)
    labels = org.token_labels(exs)
    by_rgb = {rgb: 1 + i for i, rgb in enumerate(COLORS.values())}
    for b, ex in enumerate(exs):
        for k in range(GRID * GRID):
            r, c = divmod(k, GRID)
            centre = tuple(int(v) for v in ex.image[r * CELL + CELL // 2, c * CELL + CELL // 2])
            assert labels["color"][b, k] == by_rgb.get(centre, 0)
            assert labels["row"][b, k] == pytest.approx(r / 4.5 - 1) and labels["col"][b, k] == pytest.approx(c / 4.5 - 1)
        named = {tuple(rc) for rc in ex.truth["target_cells"]}
        named_role = (labels["role_1"][b] == ROLES.index("named")) | (labels["role_1"][b] == ROLES.index("second"))
        assert {divmod(int(k), GRID) for k in named_role.nonzero().flatten()} == named
        # the role covers every cell: background exactly where no object is drawn, "other" on the unnamed objects
        assert ((labels["role_1"][b] == ROLES.index("background")) == (labels["color"][b] == 0)).all()
        others = {(o["row"], o["col"]) for o in ex.truth["objects"]} - named
        assert {divmod(int(k), GRID) for k in (labels["role_1"][b] == ROLES.index("other")).nonzero().flatten()} == others
        # the relation's second object has its own class; row / column classes are the cell's own coordinates
        second = {tuple(ex.truth["target_cells"][1])} if ex.task == "relation" else set()
        assert {divmod(int(k), GRID) for k in (labels["role_1"][b] == ROLES.index("second")).nonzero().flatten()} == second
        assert [(int(labels["row_class"][b, k]), int(labels["col_class"][b, k])) for k in range(GRID * GRID)] == [divmod(k, GRID) for k in range(GRID * GRID)]
        # the answer-position count head: the counting answer's number, nothing for the other tasks
        expected_count = NUMBER_WORDS.index(ex.answer) if ex.task == "counting" else IGNORE
        assert int(labels["answer_count"][b]) == expected_count
        # the relation word's index (relation questions) and the named cells' coordinates (relation, location)
        words = ex.prompt.split()
        assert int(labels["answer_relation"][b]) == (next(i for i, r in enumerate(RELATIONS) if r in words)
                                                     if ex.task == "relation" else IGNORE)
        coords = labels["answer_coords"][b]
        flat = [v / 4.5 - 1 for cell in ex.truth["target_cells"] for v in cell] if ex.task in ("relation", "location") else []
        assert coords[:len(flat)].tolist() == pytest.approx(flat) and bool(torch.isnan(coords[len(flat):]).all())
    assert labels["answer_count"].shape == (len(exs),) and (labels["answer_count"] != IGNORE).sum() == 3  # 12 examples, 4 tasks


def test_video_token_labels_cover_exactly_the_shape_pixels():
    org = get_organism("video-qwen2-vl")
    exs = org.generate(9, seed=4)
    labels = org.token_labels(exs)
    side = SIZE // MERGED
    for b, ex in enumerate(exs):
        for k in range(labels["color"].shape[1]):
            s, rest = divmod(k, side * side)
            r, c = divmod(rest, side)
            region = ex.video[s * TPS:(s + 1) * TPS, r * MERGED:(r + 1) * MERGED, c * MERGED:(c + 1) * MERGED]
            touched = bool((region != np.array(BACKGROUND, np.uint8)).any())
            # a circle or triangle leaves its box's corners empty: a labelled token may hold no pixel of it,
            # but every token that shows a shape pixel is labelled
            if touched:
                assert labels["color"][b, k] > 0, (b, k)
        moving = labels["moving"][b].reshape(FRAMES // TPS, side * side).amax(-1)
        if ex.task == "motion":
            assert bool(moving.any()) == (ex.answer == "yes")
        if ex.task == "direction":
            first, last = ex.truth["answer_slices"][0], ex.truth["answer_slices"][-1]
            direction = 1 + ["left", "right", "up", "down"].index(ex.answer)
            assert moving[first:last + 1].tolist() == [direction] * (last - first + 1)
            assert not moving[:first].any() and not moving[last + 1:].any()


@pytest.mark.slow
def test_token_head_loss_is_answer_loss_plus_weighted_probe_losses():
    from hooked_vlm.organisms.qwen_common import TokenHeads
    from hooked_vlm.organisms.training import answer_loss

    org = get_organism("grid-qwen2.5-vl")
    tok = org.tokenizer()
    torch.manual_seed(0)
    specs = org.token_heads  # the recipe's heads: per cell, and at the answer position
    assert set(org.ANSWER_HEADS) <= set(specs) and {s.at for s in specs} == {"visual", "answer"}
    wrapped = TokenHeads(org.build_model(0), specs, [tok.convert_tokens_to_ids("<|image_pad|>")])
    exs = org.generate(4, seed=5)  # one example of each task (counting feeds the answer-position count head)
    assert {e.task for e in exs} == set(org.tasks)
    inputs, mask = org.encode(exs, tok)
    labels = org.token_labels(exs)
    with torch.no_grad():
        total, parts = wrapped.loss(inputs, mask, labels)
        out = wrapped.model(**inputs, output_hidden_states=True)
        expected = answer_loss(out.logits, inputs["input_ids"], mask)
        # by hand: the image tokens' hidden states, example by example, in cell order; answer heads read the
        # <|vision_end|> token (the prompt's last token, which predicts the answer's first word)
        for spec in specs:
            terms = []
            for b in range(4):
                if spec.at == "answer":
                    rows = (inputs["input_ids"][b] == tok.convert_tokens_to_ids("<|vision_end|>")).nonzero().flatten()
                    terms.append((out.hidden_states[spec.layer][b, rows], labels[spec.name][b].reshape(1, -1).squeeze(-1)))
                    continue
                rows = (inputs["input_ids"][b] == tok.convert_tokens_to_ids("<|image_pad|>")).nonzero().flatten()
                terms.append((out.hidden_states[spec.layer][b, rows], labels[spec.name][b]))
            hidden = torch.cat([h for h, _ in terms])
            target = torch.cat([y for _, y in terms])
            pred = wrapped.heads[spec.name](hidden)
            if spec.regression:  # the mean over the known targets (NaN: none)
                known = ~torch.isnan(target)
                part = ((pred[known] - target[known]) ** 2).mean()
            elif spec.classes == 1:
                part = ((pred.squeeze(-1) - target) ** 2).mean()
            else:
                keep = target != IGNORE
                logp = pred.log_softmax(-1)[torch.arange(len(target)), target.clamp(min=0)]
                w = (torch.tensor(spec.class_weight)[target.clamp(min=0)] if spec.class_weight else torch.ones(len(target))) * keep
                part = -(w * logp).sum() / w.sum()
            assert parts[spec.name] == pytest.approx(float(part), rel=1e-5)
            expected = expected + spec.weight * part
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    # nothing of the heads is in the model that gets saved
    assert not any("heads" in n for n, _ in wrapped.model.named_parameters())


def test_linear_patch_embedding_equals_the_conv_and_is_undone():
    from hooked_vlm.organisms.training import linear_patch_embedding

    org = get_organism("grid-qwen2.5-vl")
    model = org.build_model(0).eval()
    conv = model.model.visual.patch_embed.proj
    assert isinstance(conv, torch.nn.Conv3d)
    x = torch.randn(50, 3, 2, 14, 14)
    want = conv(x)
    with linear_patch_embedding(model):
        got = conv(x)
        assert conv.forward.func.__name__ == "_patch_as_linear"  # it really ran the matrix product
        grads = torch.autograd.grad(got.sum(), conv.weight)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the same gradient as the conv's (training updates the conv's own weights)
    torch.testing.assert_close(grads, torch.autograd.grad(conv(x).sum(), conv.weight)[0], atol=1e-4, rtol=1e-5)
    assert "forward" not in vars(conv)  # restored: the saved model is the plain conv
    # a patch conv with a bias (other towers have one) keeps it
    torch.manual_seed(1)
    biased = torch.nn.Sequential(torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=True))
    want = biased(x)
    with linear_patch_embedding(biased):
        got = biased(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefetched_batches_are_the_same_batches_in_order():
    from hooked_vlm.organisms.training import _batches

    def make(step):
        return {"step": torch.tensor(step), "value": torch.arange(3) * step}

    got = list(_batches(make, 7, prefetch=True))
    assert [int(b["step"]) for b in got] == list(range(7))
    assert all(torch.equal(b["value"], make(s)["value"]) for s, b in enumerate(got))
