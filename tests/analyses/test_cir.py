"""composed image retrieval: retrieval, the four explanations, their sanity checks, the commands and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses.pipelines import ModelSpec, RunConfig
from analyses.pipelines.cir.database import DatabaseError, build_database, load_database
from analyses.pipelines.cir.explain import composed_embedding, explain_query, upsample
from analyses.pipelines.cir.model import load_cir_model
from analyses.pipelines.cir.phi import CaptionError, PhiError, check_phi_width, compose_text, load_phi_checkpoint
from tests.analyses.cir_helpers import mass_ratio, save_tiny_two_tower, shape_mask, write_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def organism():
    """The shapes-clip organism as the CIR commands load it, with its phi and the HF twin."""
    from hooked_vlm.organisms import checkpoint_dir, get_organism

    loaded = load_cir_model(ModelSpec("shapes-clip"))
    org = get_organism("shapes-clip")
    clip, tokenizer, phi = org.load(checkpoint_dir("shapes-clip"))
    return loaded, phi, clip, org


def _render(color, shape, place, seed=0):
    from hooked_vlm.organisms.shapes_clip import render

    return render(color, shape, place, np.random.default_rng(seed))


def _query(loaded, phi, reference, caption, candidates, methods=("eclip", "gradxact")):
    composed = compose_text(loaded.tokenizer, caption, "<$>", loaded.model.text.spec.max_positions)
    return composed, explain_query(loaded.model, phi, loaded.prep(reference), composed, [loaded.prep(c) for c in candidates], methods)


def test_composed_embedding_equals_the_transformers_path(organism):
    from hooked_vlm.organisms.shapes_clip import PSEUDO_TOKEN, compose_text_embeds

    loaded, phi, clip, org = organism
    ref = _render("red", "circle", "top left")
    composed = compose_text(loaded.tokenizer, "is blue", PSEUDO_TOKEN, loaded.model.text.spec.max_positions)
    ours = composed_embedding(loaded.model, phi, loaded.prep(ref), composed)
    with torch.no_grad():
        word = phi(clip.get_image_features(pixel_values=org.pixel_values([ref])).pooler_output)
        theirs = compose_text_embeds(clip, composed.input_ids, composed.attention_mask, composed.pseudo_id, word)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert torch.equal(loaded.prep(ref), org.pixel_values([ref]))  # the command's preprocessing is the organism's


def test_gradient_x_activation_maps_equal_an_independent_transformers_computation(organism):
    """Targets 1 and 2 (reference maps) by hand on transformers' CLIPModel: ReLU(sum_c a * dS/da) at the last block's input."""
    from hooked_vlm.organisms.shapes_clip import compose_text_embeds

    loaded, phi, clip, org = organism
    ref, cand = _render("green", "square", "bottom right"), _render("blue", "square", "bottom right", 1)
    composed, expl = _query(loaded, phi, ref, "is blue", [cand], methods=("gradxact",))
    out = clip.vision_model(pixel_values=org.pixel_values([ref]), output_hidden_states=True)
    act = out.hidden_states[-2]  # input of the last block
    ref_emb = clip.visual_projection(out.pooler_output)
    word = phi(ref_emb)
    (g1,) = torch.autograd.grad(word.norm(), act, retain_graph=True)
    text = compose_text_embeds(clip, composed.input_ids, composed.attention_mask, composed.pseudo_id, word)
    cand_out = clip.vision_model(pixel_values=org.pixel_values([cand]), output_hidden_states=True)
    cand_act = cand_out.hidden_states[-2]
    cand_emb = clip.visual_projection(cand_out.pooler_output)
    g2, g3 = torch.autograd.grad(torch.nn.functional.cosine_similarity(cand_emb, text).sum(), [act, cand_act])
    signed = []
    for a, g, ours in ((act, g1, expl.reference["gradxact"]), (act, g2, expl.candidate_reference[0]["gradxact"]),
                       (cand_act, g3, expl.candidates[0]["gradxact"])):
        raw = (a[0, 1:] * g[0, 1:]).sum(-1).reshape(4, 4).detach()
        signed.append(bool((raw < 0).any()))
        scale = float(raw.abs().max())  # these products are small (1e-7 here): compare relative to their size
        torch.testing.assert_close(ours / scale, raw.clamp(min=0) / scale, atol=5e-2, rtol=0)  # float32 cancellation: ~2% of scale
    assert any(signed)  # some patches carry negative evidence: the ReLU matters here


def test_candidate_and_text_maps_equal_grad_eclip_when_the_pseudo_word_is_a_real_word(organism):
    """With phi replaced by the embedding of 'red', the composed text IS 'a photo of red that is blue': maps 3 and 4
    must equal analyses.attribution.grad_eclip on that plain text (an independent, tested implementation)."""
    from analyses.attribution import grad_eclip

    loaded, _, _, _ = organism
    tok = loaded.tokenizer
    red = loaded.model.text.token_embed.weight[tok.convert_tokens_to_ids("red")].detach()

    class RedWord(torch.nn.Module):
        def forward(self, x):
            return red[None].expand(x.shape[0], -1) + 0 * x.sum()

    ref, cand = _render("red", "circle", "center"), _render("blue", "circle", "center", 3)
    composed, expl = _query(loaded, RedWord(), ref, "is blue", [cand], methods=("eclip",))
    plain = tok(["a photo of red that is blue"], return_tensors="pt")
    want = grad_eclip(loaded.model, loaded.prep(cand), plain["input_ids"], plain["attention_mask"])
    torch.testing.assert_close(expl.candidates[0]["eclip"], want.image, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(expl.text[0]["eclip"], want.text, atol=1e-6, rtol=1e-4)
    assert expl.scores[0] == pytest.approx(want.score, abs=1e-6)


def test_reference_map_concentrates_on_the_shape_and_top_candidate_on_the_recoloured_shape(organism):
    """Planted truth (measured over all 100 references in docs/cir.md): single-shape references put their Grad-ECLIP
    mass on the shape; when the top result is the right one (same shape and place, the caption's colour), its map
    concentrates on that recoloured shape. Maps whose ReLU leaves nothing (about 15%) are counted, not scored."""
    from hooked_vlm.organisms.shapes_clip import COLORS

    loaded, phi, _, org = organism
    combos, images = org.database()
    db = torch.nn.functional.normalize(torch.cat([loaded.model.encode_image(loaded.prep(im)).detach() for im in images]), dim=-1)
    ref_ratios, cand_ratios, empty = [], [], 0
    for i, (color, shape, place) in enumerate(combos[::5]):
        new = [c for c in COLORS if c != color][i % 4]
        ref = _render(color, shape, place, 10 + i)
        composed = compose_text(loaded.tokenizer, f"is {new}", "<$>", 16)
        q = torch.nn.functional.normalize(composed_embedding(loaded.model, phi, loaded.prep(ref), composed), dim=-1)
        top = int((db @ q[0]).argmax())
        _, expl = _query(loaded, phi, ref, f"is {new}", [images[top]], methods=("eclip",))
        if float(expl.reference["eclip"].sum()) == 0:
            empty += 1
            continue
        ref_ratios.append(mass_ratio(upsample(expl.reference["eclip"], (64, 64)).numpy(), shape_mask(ref)))
        if combos[top] == (new, shape, place) and float(expl.candidates[0]["eclip"].sum()) > 0:
            cand_ratios.append(mass_ratio(upsample(expl.candidates[0]["eclip"], (64, 64)).numpy(), shape_mask(images[top])))
    assert empty <= 5 and len(ref_ratios) >= 15
    assert np.median(ref_ratios) > 2.0 and np.mean(np.array(ref_ratios) > 1) >= 0.85, ref_ratios
    assert len(cand_ratios) >= 2 and min(cand_ratios) > 1.5, cand_ratios


def test_sanity_checks_identical_candidate_caption_swap_noise(organism):
    loaded, phi, _, _ = organism
    ref = _render("red", "circle", "top left", 10)
    _, expl = _query(loaded, phi, ref, "is green", [ref.copy()])
    for m in ("eclip", "gradxact"):
        assert torch.count_nonzero(expl.differences[0][m]) == 0  # identical candidate: a flat (zero) difference
        for grid in (expl.reference[m], expl.candidates[0][m], expl.candidate_reference[0][m]):
            assert torch.isfinite(grid).all() and float(grid.min()) >= 0
            # non-constant, except that a Grad-ECLIP map can be empty (ReLU of nothing positive: reported, never filled)
            assert float(grid.max() - grid.min()) > 0 or (m == "eclip" and float(grid.max()) == 0)
    _, swapped = _query(loaded, phi, ref, "is yellow", [ref.copy()])
    for m in ("eclip", "gradxact"):
        change = (swapped.candidates[0][m] - expl.candidates[0][m]).abs().max() / expl.candidates[0][m].abs().max()
        assert change > 0.05, (m, float(change))
        assert not torch.allclose(swapped.text[0][m], expl.text[0][m])
    # noise: averaged over noise images the Grad-ECLIP reference map prefers no quadrant (a quarter of the mass in the
    # top-left one), while top-left circles put far more there. (Single noise maps are not flat; gradxact's are not
    # flat even on average: docs/cir.md reports both.)
    rng = np.random.default_rng(0)

    def top_left_share(images):
        maps = [explain_query(loaded.model, phi, loaded.prep(im), compose_text(loaded.tokenizer, "is red", "<$>", 16), [],
                              methods=("eclip",)).reference["eclip"] for im in images]
        mean = torch.stack([m / m.sum() for m in maps if m.sum() > 0]).mean(0)
        return float(mean[:2, :2].sum())

    noise = top_left_share([np.random.default_rng(s).integers(0, 256, (64, 64, 3), dtype=np.uint8) for s in range(8)])
    circles = top_left_share([_render("red", "circle", "top left", s) for s in range(8)])
    assert abs(noise - 0.25) < 0.08 and circles > noise + 0.1, (noise, circles)


@pytest.mark.slow
def test_build_db_query_command_writes_every_output_and_resumes(tmp_path):
    from hooked_vlm.cli import main

    images, db = tmp_path / "images", tmp_path / "db.safetensors"
    out = []
    assert main(["cir", "build-db", "--make-data", "--images", str(images), "--database", str(db), "--limit", "12", "--no-progress"]) == 0
    database = load_database(db)
    assert len(list(images.glob("*.png"))) == 100 and len(database.files) == 12
    assert torch.allclose(database.embeddings.norm(dim=-1), torch.ones(12), atol=1e-5)
    ref = images / database.files[3]
    args = ["cir", "query", "--database", str(db), "--dataset-path", str(images), "--reference-image", str(ref), "--caption", "is blue",
            "--top-k", "5", "--generate-saliency", "--max-candidate-saliency", "2", "--generate-text-attribution",
            "--save-saliency-dir", str(tmp_path / "sal"), "--output-format", "json", "--no-progress"]
    import io

    buf = io.StringIO()
    assert main(args, stdout=buf) == 0
    doc = json.loads((tmp_path / "sal" / "query.json").read_text())
    assert json.loads(buf.getvalue()) == doc
    assert [r["rank"] for r in doc["results"]] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in doc["results"]]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(doc["explained_scores"], scores[:2], atol=1e-5)  # the explained score is the ranking score
    for name in ("reference_heatmap.png", "reference_saliency.npy", "reference_text_attribution.png"):
        assert (tmp_path / "sal" / name).is_file() and (tmp_path / "sal" / "gradxact" / name).is_file()
    for k, r in enumerate(doc["results"][:2], start=1):
        stem = Path(r["file"]).stem
        for pattern in ("result_{k}_heatmap_{n}.png", "result_{k}_saliency_{n}.npy", "result_{k}_ref_heatmap_{n}.png",
                        "result_{k}_ref_saliency_{n}.npy", "text_attribution_{n}.png"):
            assert (tmp_path / "sal" / pattern.format(k=k, n=stem)).is_file(), pattern
        sal = np.load(tmp_path / "sal" / f"result_{k}_saliency_{stem}.npy")
        assert sal.shape == (64, 64) and np.isfinite(sal).all() and sal.max() > sal.min()
    assert len(doc["maps"]["eclip"]["results"][0]["text_values"]) == len(doc["query"]["tokens"])
    before = (tmp_path / "sal" / "reference_saliency.npy").read_bytes()
    assert main(args, stdout=io.StringIO()) == 0  # resumed: the stored query is not recomputed, files unchanged
    assert (tmp_path / "sal" / "reference_saliency.npy").read_bytes() == before
    manifest = json.loads((tmp_path / "sal_run" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == 1 and manifest["counts"]["done"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_commands_run_on_tiny_random_checkpoint_folders(tmp_path, name):
    from hooked_vlm.cli import main

    folder = save_tiny_two_tower(tmp_path / "ckpt", name)
    size = 64 if name == "tiny-clip" else 56
    write_images(tmp_path / "images", 4, size + 8)  # not the tower's size: maps come back at the image's own size
    db = tmp_path / "db.safetensors"
    assert main(["cir", "build-db", "--model", str(folder), "--images", str(tmp_path / "images"), "--database", str(db), "--no-progress"]) == 0
    args = ["cir", "query", "--model", str(folder), "--database", str(db), "--dataset-path", str(tmp_path / "images"),
            "--reference-image", str(tmp_path / "images" / "img_0.png"), "--caption", "is blue", "--pseudo-token", "picture",
            "--top-k", "3", "--generate-saliency", "--max-candidate-saliency", "2", "--save-saliency-dir", str(tmp_path / "sal"), "--no-progress"]
    assert main(args) == 0
    doc = json.loads((tmp_path / "sal" / "query.json").read_text())
    np.testing.assert_allclose(doc["explained_scores"], [r["score"] for r in doc["results"][:2]], atol=1e-5)
    sal = np.load(doc["maps"]["eclip"]["results"][0]["saliency"])
    assert sal.shape == (size + 8, size + 8) and np.isfinite(sal).all()


def test_bad_inputs_name_the_problem(organism, tmp_path):
    from hooked_vlm.cli import main
    from hooked_vlm.organisms.shapes_clip import Phi, save_phi

    loaded, phi, _, _ = organism
    # a database built with another model
    tiny = save_tiny_two_tower(tmp_path / "tiny", "tiny-clip")
    write_images(tmp_path / "images", 2, 64)
    build_database(tmp_path / "images", tmp_path / "tiny.safetensors", tmp_path / "run", RunConfig(model=str(tiny), progress=False))
    with pytest.raises(DatabaseError, match="was built with model .* rebuild the database"):
        load_database(tmp_path / "tiny.safetensors").check_model(loaded.fingerprint(), "shapes-clip")
    with pytest.raises(DatabaseError, match="was built with model"):  # extending it with another model is refused too
        build_database(tmp_path / "images", tmp_path / "tiny.safetensors", tmp_path / "run2", RunConfig(model="shapes-clip", progress=False))
    # a phi of the wrong width
    (tmp_path / "wrong").mkdir()
    save_phi(Phi(16, 8, 32), tmp_path / "wrong")
    with pytest.raises(PhiError, match="maps 16-d image embeddings to 32-d words, but the model's image embeddings are 32-d"):
        check_phi_width(load_phi_checkpoint(tmp_path / "wrong"), loaded.model, "wrong")
    with pytest.raises(PhiError, match="holds no phi checkpoint"):
        load_phi_checkpoint(tmp_path / "images")
    # a caption without room for the pseudo-word
    with pytest.raises(CaptionError, match="no room for the pseudo-word .* shorten the caption"):
        compose_text(loaded.tokenizer, "is blue " * 8, "<$>", 16)
    with pytest.raises(CaptionError, match="holds the pseudo-word"):
        compose_text(loaded.tokenizer, "is <$>", "<$>", 16)
    # a queries file with a missing reference: recorded and skipped, the other query completes
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "ok", "reference_image": "images/img_0.png", "caption": "is blue"}\n'
                       '{"id": "gone", "reference_image": "images/missing.png", "caption": "is blue"}\n')
    assert main(["cir", "query", "--model", str(tiny), "--database", str(tmp_path / "tiny.safetensors"), "--dataset-path",
                 str(tmp_path / "images"), "--pseudo-token", "picture", "--queries", str(queries), "--output-dir", str(tmp_path / "qrun"),
                 "--no-progress"]) == 0
    from analyses.pipelines import load_failures, load_results

    assert load_results(tmp_path / "qrun")["case_id"].tolist() == ["ok"]
    fail = load_failures(tmp_path / "qrun")
    assert fail["case_id"].tolist() == ["gone"] and "missing.png" in fail["message"].iloc[0] and "does not exist" in fail["message"].iloc[0]
