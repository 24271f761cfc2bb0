"""Labelled image grids: the pictures people compare (the demo's base-vs-merged grid, the mini
world's report). Every row is labelled, and so is every column when headers are given, so a
grid read alone says which image is which."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

LINE_PX = 12  # PIL's default bitmap font


def labelled_grid(rows: list[tuple[str, list[Image.Image | None]]], path: Path, *, cell: int = 128,
                  columns: list[str] | None = None, label_width: int = 200,
                  captions: list[list[str]] | None = None) -> Path:
    """Write ``rows`` (label, images; a None image is a gap) as one PNG, each image scaled to
    ``cell`` pixels (nearest-neighbour when enlarging, so tiny renders stay crisp).
    ``captions[r][c]``, when given, is written under image c of row r (wrapped to the cell; what
    made the image, e.g. the experts and their weights)."""
    ncol = max((len(images) for _, images in rows), default=0)
    head = LINE_PX + 8 if columns else 0
    cell_chars = max(8, cell // 6)
    wrapped = [[textwrap.wrap(text, cell_chars) for text in row] for row in captions or []]
    below = [max((len(lines) for lines in row), default=0) * LINE_PX + (4 if row else 0) for row in wrapped]
    below += [0] * (len(rows) - len(below))
    tops = [head + sum(cell + 2 + b for b in below[:r]) for r in range(len(rows))]
    height = head + sum(cell + 2 + b for b in below)
    grid = Image.new("RGB", (label_width + ncol * (cell + 2), height), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(columns or []):
        draw.text((label_width + c * (cell + 2) + 2, 4), title[: cell // 6], fill="black")
    chars = max(8, label_width // 6 - 1)
    for r, (label, images) in enumerate(rows):
        y = tops[r]
        lines = textwrap.wrap(label, chars)[: max(1, cell // LINE_PX)]
        for i, line in enumerate(lines):
            draw.text((4, y + (cell - len(lines) * LINE_PX) // 2 + i * LINE_PX), line, fill="black")
        for c, image in enumerate(images):
            x = label_width + c * (cell + 2)
            if image is not None:
                resample = Image.NEAREST if max(image.size) <= cell else Image.LANCZOS
                grid.paste(image.convert("RGB").resize((cell, cell), resample), (x, y))
            for i, line in enumerate(wrapped[r][c] if r < len(wrapped) and c < len(wrapped[r]) else []):
                draw.text((x + 2, y + cell + 2 + i * LINE_PX), line, fill="dimgray")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
