"""Products of a tall stacked matrix with a handful of request vectors, the shape of every per-request op here.

`matrix @ vectors.T` is a GEMM, which OpenBLAS splits over all its threads: for (1000 x 384) x (384 x 3) the thread
hand-off costs more than the arithmetic, and on a busy host (vLLM next door) it measured 12-24 ms instead of 0.25 ms.
One GEMV per vector stays on the calling thread; a request has at most `LETHE_GATE_MAX_WINDOWS` vectors.
"""

from __future__ import annotations

import numpy as np


def rows_dot(matrix: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """`vectors @ matrix.T`, shape (n, m), as n matrix-vector products; matrix (m, d) C-contiguous, vectors (n, d)."""
    if len(vectors) == 0:
        return np.zeros((0, matrix.shape[0]), dtype=np.result_type(matrix, vectors))
    return np.stack([matrix @ v for v in vectors])
