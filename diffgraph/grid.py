"""Labelled image grids: the pictures people compare (the demo's base-vs-merged grid, the mini
world's report). Every row is labelled, and so is every column when headers are given, so a
grid read alone says which image is which."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

LINE_PX = 12  # PIL's default bitmap font


def labelled_grid(rows: list[tuple[str, list[Image.Image | None]]], path: Path, *, cell: int = 128,
                  columns: list[str] | None = None, label_width: int = 200) -> Path:
    """Write ``rows`` (label, images; a None image is a gap) as one PNG, each image scaled to
    ``cell`` pixels (nearest-neighbour when enlarging, so tiny renders stay crisp)."""
    ncol = max((len(images) for _, images in rows), default=0)
    head = LINE_PX + 8 if columns else 0
    grid = Image.new("RGB", (label_width + ncol * (cell + 2), head + len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(columns or []):
        draw.text((label_width + c * (cell + 2) + 2, 4), title[: cell // 6], fill="black")
    chars = max(8, label_width // 6 - 1)
    for r, (label, images) in enumerate(rows):
        y = head + r * (cell + 2)
        lines = textwrap.wrap(label, chars)[: max(1, cell // LINE_PX)]
        for i, line in enumerate(lines):
            draw.text((4, y + (cell - len(lines) * LINE_PX) // 2 + i * LINE_PX), line, fill="black")
        for c, image in enumerate(images):
            if image is not None:
                resample = Image.NEAREST if max(image.size) <= cell else Image.LANCZOS
                grid.paste(image.convert("RGB").resize((cell, cell), resample), (label_width + c * (cell + 2), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
