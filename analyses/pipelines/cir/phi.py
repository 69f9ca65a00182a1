"""SEARLE's phi (image embedding -> one pseudo-word input embedding) and the composed query text around it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["PhiError", "CaptionError", "ComposedText", "load_phi_checkpoint", "check_phi_width", "compose_text", "pseudo_token_of",
           "TEMPLATE"]

#: SEARLE's composed query: the pseudo-word ``$`` stands for the reference image
TEMPLATE = "a photo of $ that {caption}"
PHI_SUBDIR, PHI_WEIGHTS, PHI_CONFIG = "phi", "model.safetensors", "config.json"


class PhiError(ValueError):
    """A phi checkpoint that is missing, unreadable or of the wrong width for the model."""


class CaptionError(ValueError):
    """A caption that cannot become a composed query (no room for the pseudo-word, or it holds one itself)."""


def _phi_folder(path: Path) -> Path:
    if (path / PHI_SUBDIR / PHI_CONFIG).is_file():
        return path / PHI_SUBDIR
    if (path / PHI_CONFIG).is_file() and (path / PHI_WEIGHTS).is_file() and not (path / "preprocessor_config.json").exists():
        return path
    raise PhiError(f"{path} holds no phi checkpoint (expected {PHI_SUBDIR}/{PHI_CONFIG} + {PHI_SUBDIR}/{PHI_WEIGHTS}, or "
                   f"{PHI_CONFIG} + {PHI_WEIGHTS} in the folder itself); pass --phi FOLDER of a trained phi "
                   "(the shapes-clip organism ships one)")


def load_phi_checkpoint(path: str | Path) -> torch.nn.Module:
    """A SEARLE phi (``hooked_vlm.organisms.shapes_clip.Phi``) from safetensors + config.json, in eval mode."""
    from safetensors.torch import load_file

    from hooked_vlm.organisms.shapes_clip import Phi

    path = Path(path)
    if not path.exists():
        raise PhiError(f"phi checkpoint {path} does not exist; pass --phi FOLDER (a checkpoint folder with phi/, or the phi folder)")
    folder = path if path.is_dir() else path.parent
    folder = _phi_folder(folder)
    config = json.loads((folder / PHI_CONFIG).read_text())
    missing = {"d_image", "d_hidden", "d_word"} - set(config)
    if missing:
        raise PhiError(f"{folder / PHI_CONFIG} lacks {sorted(missing)}; a phi config names d_image, d_hidden and d_word")
    phi = Phi(int(config["d_image"]), int(config["d_hidden"]), int(config["d_word"]))
    try:
        phi.load_state_dict(load_file(str(folder / PHI_WEIGHTS)))
    except RuntimeError as err:
        raise PhiError(f"{folder / PHI_WEIGHTS} does not match its config {config}: {err}") from None
    return phi.eval()


def check_phi_width(phi: torch.nn.Module, model: Any, where: str) -> None:
    """Refuse a phi whose input is not the model's image-embedding width or whose output is not its word width."""
    d_image, d_word = phi.config["d_image"], phi.config["d_word"]
    want_image = model.visual_projection.out_features if model.visual_projection is not None else model.vision.spec.width
    want_word = model.text.spec.width
    if (d_image, d_word) != (want_image, want_word):
        raise PhiError(f"phi {where} maps {d_image}-d image embeddings to {d_word}-d words, but the model's image embeddings "
                       f"are {want_image}-d and its text tower's word embeddings {want_word}-d; pass the phi trained "
                       "for this model (--phi)")


def pseudo_token_of(tokenizer: Any, wanted: str | None) -> str:
    """The pseudo-word token: ``wanted``, else ``<$>`` or ``$`` when the tokenizer has it as one token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in ([wanted] if wanted else ["<$>", "$"]):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != unk:
            return token
    raise CaptionError(f"the tokenizer has no single token for the pseudo-word ({wanted or '<$> or $'}); pass --pseudo-token "
                       "with a token of its vocabulary (e.g. an unused special token)")


@dataclass
class ComposedText:
    """The tokenised composed query and where its pseudo-word sits."""

    text: str
    input_ids: Int[Tensor, "1 pos"]
    attention_mask: Int[Tensor, "1 pos"]
    pseudo_id: int
    pseudo_position: int
    tokens: list[str]


def compose_text(tokenizer: Any, caption: str, pseudo_token: str, max_positions: int, template: str = TEMPLATE) -> ComposedText:
    """``template`` with ``$`` -> the pseudo token and ``{caption}`` filled, tokenised and checked to fit the tower."""
    caption = caption.strip()
    if not caption:
        raise CaptionError("the caption is empty; give the relative caption, e.g. --caption 'is blue'")
    if pseudo_token in caption:
        raise CaptionError(f"the caption {caption!r} holds the pseudo-word {pseudo_token!r} itself; the template adds it once")
    text = template.replace("$", pseudo_token).format(caption=caption)
    enc = tokenizer([text], return_tensors="pt")
    ids = enc["input_ids"]
    pseudo_id = int(tokenizer.convert_tokens_to_ids(pseudo_token))
    where = (ids[0] == pseudo_id).nonzero().flatten()
    if ids.shape[1] > max_positions:
        raise CaptionError(f"the composed query {text!r} is {ids.shape[1]} tokens but the text tower holds {max_positions}: no room "
                           f"for the pseudo-word and the end token; shorten the caption by {ids.shape[1] - max_positions} token(s)")
    if where.numel() != 1:
        raise CaptionError(f"the composed query {text!r} holds the pseudo-word {where.numel()} times after tokenisation; it must "
                           "hold it once (pass --pseudo-token with a single token of the vocabulary)")
    mask = enc.get("attention_mask", torch.ones_like(ids))
    return ComposedText(text, ids, mask, pseudo_id, int(where[0]), tokenizer.convert_ids_to_tokens(ids[0].tolist()))
