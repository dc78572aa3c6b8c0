"""The template index on executors: loaded once per Python worker, searched a batch at a time."""

from __future__ import annotations

import numpy as np

from finelake.udfs.cache import get_or_load


def load_index(path: str, embedding_model: str):
    """The :class:`finelake.models.index.TemplateIndex` saved at ``path`` (cached per worker).

    Raises:
        finelake.models.index.IndexFormatError: missing files or a different embedding model.
    """
    from finelake.models.index import TemplateIndex

    return get_or_load("faiss_index", {"path": path, "model": embedding_model},
                       lambda: TemplateIndex.load(path, embedding_model=embedding_model),
                       exclusive=False)  # data beside the model, not a second model


def search_pooled(path: str, embedding_model: str, pooled: list, top_k: int, threshold: float) -> list[dict]:
    """Candidates of one document: every template whose cosine with any of the document's K+1
    pooled embeddings reaches ``threshold`` (§3.2), keeping each template's best score and the
    chunk index that gave it (0 = global embedding, 1..K = Gaussian chunks).

    Args:
        pooled: K+1 unit vectors of length d (the document's Gaussian-pooled embeddings).
        top_k: neighbours searched per vector.

    Returns:
        ``[{"template_id", "chunk_index", "score"}]`` sorted by score, best first.
    """
    index = load_index(path, embedding_model)
    q = np.asarray([np.asarray(v, dtype=np.float32) for v in pooled], dtype=np.float32)
    scores, ids = index.search(q, top_k)
    best: dict[str, tuple[float, int]] = {}
    for k, (row_scores, row_ids) in enumerate(zip(scores, ids)):
        for s, tid in zip(row_scores, row_ids):
            s = float(s)
            if s >= threshold and (tid not in best or s > best[tid][0]):
                best[tid] = (s, k)
    return [{"template_id": t, "chunk_index": k, "score": s}
            for t, (s, k) in sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))]
