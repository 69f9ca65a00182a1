"""``hooked-vlm cir build-db``: an image folder -> a database file of unit-norm embeddings + file list + model fingerprint.

The database is one safetensors file: tensor ``embeddings [N, d]`` (L2-normalised image embeddings) and metadata
``format``, ``files`` (JSON list, relative to the image folder), ``model``, ``fingerprint``, ``image_size``. Each
image is one case of the shared runner, so a killed build resumes; undecodable images are recorded and left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from analyses.pipelines import Case, CaseContext, Field, Pipeline, RunConfig, Schema, atomic_output, run_pipeline
from analyses.pipelines.cir.images import read_image
from analyses.pipelines.cir.model import CirModel, load_cir_model

__all__ = ["DB_FORMAT", "Database", "DatabaseError", "EMBED", "IMAGE_SUFFIXES", "build_database", "list_images", "load_database",
           "make_organism_images", "write_database"]

DB_FORMAT = "hooked_vlm.cir_db/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatabaseError(ValueError):
    """A database file that is missing, malformed, or built with another model."""


@dataclass
class Database:
    """Unit-norm image embeddings, the files they came from and the model that made them."""

    embeddings: Float[Tensor, "n d"]
    files: list[str]
    model: str
    fingerprint: str
    path: Path

    def check_model(self, fingerprint: str, model: str) -> None:
        """Refuse to query (or extend) the database with another model than the one that built it."""
        if fingerprint != self.fingerprint:
            raise DatabaseError(f"database {self.path} was built with model {self.model!r} (fingerprint {self.fingerprint}); "
                                f"this run uses {model!r} (fingerprint {fingerprint}); rebuild the database with this model "
                                "(hooked-vlm cir build-db --model ...) or query with the model that built it")


def embed_case(loaded: CirModel, case: Case, ctx: CaseContext) -> dict[str, Any]:
    """One image's unit-norm embedding (and its size), the model in eval mode, no gradients."""
    image = read_image(case.path("image"))
    with torch.no_grad():
        emb = loaded.model.eval().encode_image(loaded.prep(image).to(ctx.device, ctx.dtype), normalize=True)[0]
    return {"file": case.data["image"], "embedding": emb.float().cpu().tolist(), "height": image.shape[0], "width": image.shape[1],
            "input_size": loaded.prep.size}


EMBED = Pipeline(name="cir-build-db", schema=Schema(fields=(Field("image", str, path=True, help="image file, relative to the folder"),),
                                                    id_field="image"), run_case=embed_case, load_model=load_cir_model)


def list_images(folder: str | Path) -> list[str]:
    """Image files under ``folder`` (recursive, sorted), relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatabaseError(f"image folder {folder} does not exist; pass --images FOLDER (or --make-data to generate the "
                            "shapes-clip organism's database images there)")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatabaseError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_database(path: str | Path) -> Database:
    """Read a database file written by :func:`write_database` (clear errors for anything else)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DatabaseError(f"database {path} does not exist; build it with `hooked-vlm cir build-db --images FOLDER --database {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            emb = f.get_tensor("embeddings")
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise DatabaseError(f"{path} is not a CIR database ({type(err).__name__}: {err}); build one with hooked-vlm cir build-db") from None
    if meta.get("format") != DB_FORMAT:
        raise DatabaseError(f"{path} has format {meta.get('format')!r}, expected {DB_FORMAT!r}; rebuild it with hooked-vlm cir build-db")
    files = json.loads(meta["files"])
    if len(files) != emb.shape[0]:
        raise DatabaseError(f"{path} lists {len(files)} files for {emb.shape[0]} embeddings; rebuild it")
    return Database(emb.float(), files, meta["model"], meta["fingerprint"], path)


def write_database(path: str | Path, embeddings: Tensor, files: list[str], model: str, fingerprint: str, image_size: int) -> Path:
    """Write the database atomically (safetensors: embeddings + metadata)."""
    from safetensors.torch import save_file

    meta = {"format": DB_FORMAT, "files": json.dumps(files), "model": model, "fingerprint": fingerprint, "image_size": str(image_size)}
    with atomic_output(Path(path)) as tmp:
        save_file({"embeddings": embeddings.float().contiguous()}, str(tmp), metadata=meta)
    return Path(path)


def build_database(images: str | Path, database: str | Path, output_dir: str | Path, config: RunConfig, argv: list[str] | None = None) -> Any:
    """Embed every image of ``images`` (resumable, in ``output_dir``) and write ``database``; refuses to mix models."""
    files = list_images(images)
    database = Path(database)
    previous = load_database(database) if database.exists() else None
    rows = [{"image": f} for f in files]
    config.root = str(Path(images).resolve())
    config.options = dict(config.options, images=str(Path(images).resolve()))
    summary = run_pipeline(EMBED, rows, output_dir, config, argv=argv)
    fingerprint = summary.manifest["model"]["fingerprint"]
    if previous is not None:
        previous.check_model(fingerprint, config.model)
    results = summary.results()
    if len(results) == 0:
        raise DatabaseError(f"no image of {images} could be embedded; see {Path(output_dir) / 'failures'}")
    emb = torch.tensor(np.stack(results["embedding"].to_numpy()), dtype=torch.float32)
    write_database(database, emb, results["file"].tolist(), config.model, fingerprint, int(results["input_size"].iloc[0]))
    return summary


def make_organism_images(folder: str | Path) -> Path:
    """The shapes-clip organism's held-out database (one image per colour x shape x place) as PNGs + labels.csv."""
    from PIL import Image

    from hooked_vlm.organisms import get_organism

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    combos, images = get_organism("shapes-clip").database()
    lines = ["file,color,shape,place"]
    for (color, shape, place), image in zip(combos, images):
        name = f"{color}_{shape}_{place.replace(' ', '-')}.png"
        with atomic_output(folder / name) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        lines.append(f"{name},{color},{shape},{place}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder
