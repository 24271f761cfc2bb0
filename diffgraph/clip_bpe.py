"""CLIP's byte-pair-encoding vocabulary, built offline from the table that ships inside the
PyPI package open_clip_torch (installed with --no-deps; found without importing open_clip,
which needs torchvision). Used by the mini world's tokenizer and the real metric suite."""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path


def open_clip_bpe_path() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if p.is_file():
            return p
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_vocab_and_merges(bpe: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's SimpleTokenizer construction: 256 byte symbols, their end-of-word forms,
    one symbol per merge, then the two special tokens (49408 entries)."""
    path = bpe or open_clip_bpe_path()
    if path is None:
        raise RuntimeError("CLIP's BPE table is needed: pip install --no-deps open_clip_torch")
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges
