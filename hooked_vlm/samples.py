"""Deterministic synthetic inputs with ground truth, for trying the library without data.

``synthetic_grid_image`` draws coloured shapes in the cells of a grid whose cell size equals one
Qwen merged token (28 px): at 280x280 the image becomes exactly 100 visual tokens, token k
covering cell (k // 10, k % 10) (notes §8), so every annotation names the tokens that see it.
``synthetic_video`` moves one shape across a plain background, one annotation per frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import UInt8
from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "synthetic_grid_image", "synthetic_video"]

# Names are words of the tiny tokenizer's vocabulary.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (245, 245, 245)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    """Draw a filled shape inside the inclusive pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    else:
        raise ValueError(f"Unknown shape '{shape}'; choose one of {SHAPES}.")


def synthetic_grid_image(
    seed: int = 0, grid: int = 10, cell: int = 28, num_shapes: int = 12, margin: int = 4
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """An RGB image of ``num_shapes`` coloured shapes in distinct cells of a ``grid`` x ``grid`` grid.

    Returns ``(image, annotations)``; the image is ``grid * cell`` pixels square (280x280 by
    default) on a light-grey background. Each annotation is ``{"shape", "color", "rgb", "row",
    "col", "bbox"}`` with ``bbox = (x0, y0, x1, y1)`` the shape's pixel box (exclusive end), lying
    inside the cell ``[cell*col, cell*(col+1)) x [cell*row, cell*(row+1))``; annotations are sorted
    by (row, col). The same seed always gives the same image.
    """
    if not 0 < num_shapes <= grid * grid:
        raise ValueError(f"num_shapes must be in 1..{grid * grid}, got {num_shapes}.")
    if not 0 <= margin < cell // 2:
        raise ValueError(f"margin must be in 0..{cell // 2 - 1} for cell={cell}, got {margin}.")
    rng = np.random.default_rng(seed)
    size = grid * cell
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    color_names = list(COLORS)
    annotations = []
    for k in sorted(rng.choice(grid * grid, size=num_shapes, replace=False).tolist()):
        row, col = divmod(k, grid)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = color_names[int(rng.integers(len(color_names)))]
        x0, y0 = col * cell + margin, row * cell + margin
        x1, y1 = (col + 1) * cell - margin, (row + 1) * cell - margin
        _draw_shape(draw, shape, (x0, y0, x1 - 1, y1 - 1), COLORS[color])
        annotations.append(
            {"shape": shape, "color": color, "rgb": COLORS[color], "row": row, "col": col, "bbox": (x0, y0, x1, y1)}
        )
    return image, annotations


def synthetic_video(
    num_frames: int = 8, size: int | tuple[int, int] = (112, 112), seed: int = 0, object_size: int = 28
) -> tuple[UInt8[np.ndarray, "T H W 3"], list[dict[str, Any]]]:
    """Frames (T, H, W, 3) uint8 of one coloured shape moving in a straight line, bouncing off the edges.

    ``size`` is (height, width) or one side. Returns ``(frames, annotations)`` with one
    annotation per frame: ``{"frame", "shape", "color", "rgb", "bbox", "center"}`` (bbox
    ``(x0, y0, x1, y1)`` exclusive end, centre ``(x, y)`` in pixels). Deterministic in ``seed``.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}.")
    if object_size >= min(height, width):
        raise ValueError(f"object_size {object_size} must be smaller than the frame ({height}x{width}).")
    rng = np.random.default_rng(seed)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    span_x, span_y = width - object_size, height - object_size
    x, y = float(rng.integers(0, span_x + 1)), float(rng.integers(0, span_y + 1))
    step = max(1.0, min(span_x, span_y) / 4)
    angle = rng.uniform(0, 2 * np.pi)
    vx, vy = step * np.cos(angle), step * np.sin(angle)
    frames, annotations = [], []
    for t in range(num_frames):
        x0, y0 = int(round(x)), int(round(y))
        image = Image.new("RGB", (width, height), BACKGROUND)
        _draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + object_size - 1, y0 + object_size - 1), COLORS[color])
        frames.append(np.asarray(image))
        annotations.append(
            {
                "frame": t,
                "shape": shape,
                "color": color,
                "rgb": COLORS[color],
                "bbox": (x0, y0, x0 + object_size, y0 + object_size),
                "center": (x0 + object_size / 2, y0 + object_size / 2),
            }
        )
        x, vx = _bounce(x + vx, vx, span_x)
        y, vy = _bounce(y + vy, vy, span_y)
    return np.stack(frames), annotations


def _bounce(position: float, velocity: float, limit: float) -> tuple[float, float]:
    """Reflect a 1-D position into [0, limit], flipping the velocity at a wall."""
    if position < 0:
        return -position, -velocity
    if position > limit:
        return 2 * limit - position, -velocity
    return position, velocity
