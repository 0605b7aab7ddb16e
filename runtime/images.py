"""Labelled image grids as PNG (Pillow; no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ditq.errors import DitqError
from ditq.files import atomic_path


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> [N, H, W, C] uint8 (grey images keep one channel)."""
    x = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    return np.round(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)


MAX_GRID_PIXELS = 1 << 27  # 134M pixels, 400 MB as RGB


def check_grid_size(nrows: int, ncols: int, *, cell: int = 64, pad: int = 2) -> None:
    """Refuse a grid of ``nrows`` x ``ncols`` cells of more than :data:`MAX_GRID_PIXELS` (labels aside)."""
    width, height = ncols * (cell + pad) + pad, nrows * (cell + pad) + pad
    if width * height > MAX_GRID_PIXELS:
        raise DitqError(f"a grid of {nrows} x {ncols} images would be {width} x {height} pixels, over the limit of "
                        f"{MAX_GRID_PIXELS:,} pixels: ask for fewer samples, or write them to .npy")  # fmt: skip


def grid_image(
    rows: list[np.ndarray],
    *,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    cell: int = 64,
    pad: int = 2,
):
    """A ``PIL.Image`` with one row per entry of ``rows`` (each [N, C, H, W] in [0, 1]), every image
    scaled to ``cell`` pixels (nearest neighbour, so small images stay sharp), with text labels."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left = 0 if not row_labels else 8 + 7 * max(len(s) for s in row_labels)
    top = 0 if not col_labels else 16
    ncols = max(len(r) for r in rows)
    check_grid_size(len(rows), ncols, cell=cell, pad=pad)
    width = left + ncols * (cell + pad) + pad
    height = top + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels or []):
        draw.text((left + pad + c * (cell + pad) + cell // 2 - 3 * len(text), 2), text, fill=(0, 0, 0), font=font)
    for r, images in enumerate(rows):
        y = top + pad + r * (cell + pad)
        if row_labels:
            draw.text((4, y + cell // 2 - 6), row_labels[r], fill=(0, 0, 0), font=font)
        for c, img in enumerate(to_uint8(images)):
            mode = "L" if img.shape[-1] == 1 else "RGB"
            tile = Image.fromarray(img[..., 0] if mode == "L" else img, mode).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile.convert("RGB"), (left + pad + c * (cell + pad), y))
    return canvas


def image_row(images: np.ndarray, *, pad: int = 2):
    """A ``PIL.Image`` of ``images`` ([N, C, H, W] in [0, 1]) at their own size, side by side with ``pad``
    white pixels between them (one image: the image itself)."""
    from PIL import Image

    tiles = to_uint8(images)
    n, h, w, _ = tiles.shape
    check_grid_size(1, n, cell=max(h, w), pad=pad)
    canvas = Image.new("RGB", (n * w + (n - 1) * pad, h), (255, 255, 255))
    for i, img in enumerate(tiles):
        tile = Image.fromarray(img[..., 0], "L") if img.shape[-1] == 1 else Image.fromarray(img[..., :3], "RGB")
        canvas.paste(tile.convert("RGB"), (i * (w + pad), 0))
    return canvas


def save_png(image, path: str | Path) -> Path:
    """Write ``image`` atomically (a temporary sibling renamed into place)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DitqError(f"--out {path}: expected a .png file name")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
