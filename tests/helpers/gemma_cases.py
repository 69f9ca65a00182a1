"""Named Gemma 3 input cases for the tiny models (``tiny-gemma3``: 4 tokens per image)."""

from __future__ import annotations

import torch

BOI, EOI, IMG, PADID = 98, 99, 100, 2


def prompt(n_images: int, per_image: int = 4, pre=(5, 6), post=(7, 8, 9)) -> list[int]:
    ids = [0, *pre]
    for _ in range(n_images):
        ids += [BOI] + [IMG] * per_image + [EOI]
    return ids + list(post)


def make(rows: list[list[int]], n_images: int, seed: int = 0, side: str = "left", size: int = 56) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    padded = [([PADID] * (width - len(r)) + r) if side == "left" else (r + [PADID] * (width - len(r))) for r in rows]
    ids = torch.tensor(padded)
    am = torch.tensor([([0] * (width - len(r)) + [1] * len(r)) if side == "left" else ([1] * len(r) + [0] * (width - len(r))) for r in rows])
    out = {"input_ids": ids, "attention_mask": am, "token_type_ids": (ids == IMG).long()}
    if n_images:
        out["pixel_values"] = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return out


CASES = {
    "text": lambda: make([[0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]], 0),
    "image": lambda: make([prompt(1)], 1),
    "two_images": lambda: make([prompt(2)], 2),
    "batch_two_prompts": lambda: make([prompt(1), prompt(1, pre=(11, 12, 13, 14), post=(15,))], 2, side="right"),
    "padded_left": lambda: make([prompt(1, pre=(5, 6, 7, 8, 9)), prompt(1, pre=(10,), post=(11,))], 2, side="left"),
}
