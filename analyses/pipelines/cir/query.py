"""``hooked-vlm cir query``: rank a database by the composed query and write the four explanations per query.

A query is one case of the shared runner (``id``, ``reference_image``, ``caption``), so a file of queries resumes
after a kill. Per query, in its saliency folder (the folder itself for a single query, ``<dir>/<id>/`` for a file):
``reference_heatmap.png``, ``reference_saliency.npy``, ``reference_text_attribution.png``, and per explained
candidate ``k`` (rank, 1-based) with file stem ``name``: ``result_{k}_heatmap_{name}.png``,
``result_{k}_saliency_{name}.npy``, ``result_{k}_ref_heatmap_{name}.png``, ``result_{k}_ref_saliency_{name}.npy``,
``result_{k}_diff_saliency_{name}.npy``, ``text_attribution_{name}.png``, then ``query.json`` (the query, the
ranked results, every map's path and the text attributions). Maps of the first method use these names; each
further method writes the same names in a subfolder named after it. ``.npy`` maps are at the image's own pixel
size (the patch-grid map resized bilinearly); figures draw the patch grid over the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses.pipelines import Case, CaseContext, Field, Pipeline, Schema, atomic_output, atomic_write_json
from analyses.pipelines.cir.database import load_database
from analyses.pipelines.cir.explain import METHODS, composed_embedding, explain_query, upsample
from analyses.pipelines.cir.images import read_image
from analyses.pipelines.cir.model import CirModel, load_cir_model
from analyses.pipelines.cir.phi import check_phi_width, compose_text, load_phi_checkpoint, pseudo_token_of

__all__ = ["QUERY", "QUERY_SCHEMA", "run_query", "default_phi"]

QUERY_SCHEMA = Schema(fields=(
    Field("id", str),
    Field("reference_image", str, path=True, help="the reference image, relative to the queries file's folder"),
    Field("caption", str, check=lambda v: None if v.strip() else "a non-empty relative caption (e.g. 'is blue')"),
))


def default_phi(loaded: CirModel) -> Path:
    """The phi shipped beside the checkpoint (the shapes-clip organism's ``phi/``), else a clear error."""
    if loaded.checkpoint is not None and (loaded.checkpoint / "phi" / "config.json").is_file():
        return loaded.checkpoint / "phi"
    from analyses.pipelines.cir.phi import PhiError

    raise PhiError(f"{loaded.name} ships no phi; pass --phi FOLDER (a trained SEARLE phi for this model)")


def _cached(loaded: CirModel, key: str, make: Any) -> Any:
    if key not in loaded.cache:
        loaded.cache[key] = make()
    return loaded.cache[key]


def _stem(file: str) -> str:
    return Path(file).stem.replace(" ", "_")


def _save_npy(path: Path, array: np.ndarray) -> str:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array.astype(np.float32))
    return str(path)


def _save_figure(path: Path, fig: Any) -> str:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _write_maps(folder: Path, out: dict[str, Any], expl: Any, method: str, ref_image: np.ndarray, cand_images: list[np.ndarray],
                cand_files: list[str], tokens: list[str], text_attribution: bool) -> None:
    from analyses.figures import heatmap_overlay, token_bars

    folder.mkdir(parents=True, exist_ok=True)
    size = ref_image.shape[:2]
    paths = out.setdefault(method, {"results": []})
    ref = expl.reference[method]
    paths["reference_empty"] = float(ref.max()) == 0
    paths["reference_saliency"] = _save_npy(folder / "reference_saliency.npy", upsample(ref, size).numpy())
    paths["reference_heatmap"] = _save_figure(folder / "reference_heatmap.png",
                                              heatmap_overlay(ref_image, ref, title=f"phi looks here ({method})"))
    if text_attribution:
        paths["reference_text_attribution"] = _save_figure(
            folder / "reference_text_attribution.png",
            token_bars(tokens, expl.reference_text[method], title=f"reference as candidate: text ({method})"))
    for k, (image, file) in enumerate(zip(cand_images, cand_files), start=1):
        name = _stem(file)
        cand, cref, diff = expl.candidates[k - 1][method], expl.candidate_reference[k - 1][method], expl.differences[k - 1][method]
        row = {
            "rank": k, "file": file,
            "saliency": _save_npy(folder / f"result_{k}_saliency_{name}.npy", upsample(cand, image.shape[:2]).numpy()),
            "heatmap": _save_figure(folder / f"result_{k}_heatmap_{name}.png", heatmap_overlay(image, cand, title=f"#{k} {file} ({method})")),
            "ref_saliency": _save_npy(folder / f"result_{k}_ref_saliency_{name}.npy", upsample(cref, size).numpy()),
            "ref_heatmap": _save_figure(folder / f"result_{k}_ref_heatmap_{name}.png",
                                        heatmap_overlay(ref_image, cref, title=f"reference for #{k} ({method})")),
            "diff_saliency": _save_npy(folder / f"result_{k}_diff_saliency_{name}.npy", upsample(diff, image.shape[:2]).numpy()),
            # a map whose ReLU left nothing positive is written as zeros and named here (never replaced by a uniform map)
            "empty_maps": [n for n, g in (("saliency", cand), ("ref_saliency", cref)) if float(g.max()) == 0],
        }
        if text_attribution:
            row["text_attribution"] = _save_figure(folder / f"text_attribution_{name}.png",
                                                   token_bars(tokens, expl.text[k - 1][method], title=f"#{k} {file}: text ({method})"))
            row["text_values"] = [float(v) for v in expl.text[k - 1][method]]
        paths["results"].append(row)


def run_query(loaded: CirModel, case: Case, ctx: CaseContext) -> dict[str, Any]:
    """Retrieve the top-k for one query and (optionally) write its explanations; returns the ranked results."""
    opts = ctx.options
    db = _cached(loaded, f"db:{opts['database']}", lambda: load_database(opts["database"]))
    db.check_model(loaded.fingerprint(), loaded.name)
    phi_path = opts.get("phi") or str(default_phi(loaded))
    phi = _cached(loaded, f"phi:{phi_path}", lambda: load_phi_checkpoint(phi_path))
    check_phi_width(phi, loaded.model, phi_path)
    token = pseudo_token_of(loaded.tokenizer, opts.get("pseudo_token"))
    composed = compose_text(loaded.tokenizer, case.data["caption"], token, loaded.model.text.spec.max_positions, opts.get("template") or
                            "a photo of $ that {caption}")
    ref_image = read_image(case.path("reference_image"))
    ref_px = loaded.prep(ref_image)
    query = torch.nn.functional.normalize(composed_embedding(loaded.model, phi, ref_px, composed), dim=-1)
    scores = (db.embeddings @ query[0].float()).tolist()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: int(opts["top_k"])]
    ranked = [{"rank": r + 1, "file": db.files[i], "score": float(scores[i])} for r, i in enumerate(order)]
    record: dict[str, Any] = {"query_text": composed.text, "top_files": [x["file"] for x in ranked], "top_scores": [x["score"] for x in ranked]}
    folder = Path(opts["save_saliency_dir"]) if opts.get("save_saliency_dir") else ctx.output_dir / "saliency"
    if opts.get("per_query_dirs"):
        folder = folder / case.id
    doc: dict[str, Any] = {"query": {"id": case.id, "reference_image": str(case.path("reference_image")), "caption": case.data["caption"],
                                     "composed_text": composed.text, "tokens": composed.tokens, "pseudo_position": composed.pseudo_position,
                                     "top_k": int(opts["top_k"]), "database": str(opts["database"]), "phi": phi_path,
                                     "model": loaded.name, "fingerprint": loaded.fingerprint()},
                           "results": ranked}
    if opts.get("generate_saliency"):
        n = min(len(ranked), int(opts.get("max_candidate_saliency") or len(ranked)))
        files = [ranked[k]["file"] for k in range(n)]
        dataset = Path(opts["dataset_path"])
        images = [read_image(dataset / f) for f in files]
        methods = list(opts.get("methods") or METHODS)
        expl = explain_query(loaded.model, phi, ref_px, composed, [loaded.prep(im) for im in images], methods)
        maps: dict[str, Any] = {}
        for i, method in enumerate(methods):
            _write_maps(folder if i == 0 else folder / method, maps, expl, method, ref_image, images, files, composed.tokens,
                        bool(opts.get("generate_text_attribution")))
        doc["explained_scores"] = expl.scores
        doc["maps"] = maps
        record["explained"] = n
        record["max_abs_score_gap"] = float(max((abs(a - ranked[k]["score"]) for k, a in enumerate(expl.scores)), default=0.0))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "query.json", doc)
    record["json"] = str(folder / "query.json")
    return record


QUERY = Pipeline(name="cir-query", schema=QUERY_SCHEMA, run_case=run_query, load_model=load_cir_model)
