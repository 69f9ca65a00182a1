"""Filled shapes drawn into an inclusive pixel box, shared by the grid and video organisms' generators."""

from __future__ import annotations

from PIL import ImageDraw

__all__ = ["SHAPES", "draw_shape"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: tuple[int, int, int], box: tuple[int, int, int, int]) -> None:
    """Draw ``shape`` filling the inclusive box (x0, y0, x1, y1); squares are inset one pixel, crosses 7 px thick."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=color)
    elif shape == "square":
        draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "cross":
        cx, cy, t = (x0 + x1) // 2, (y0 + y1) // 2, 3
        draw.rectangle([x0, cy - t, x1, cy + t], fill=color)
        draw.rectangle([cx - t, y0, cx + t, y1], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")
