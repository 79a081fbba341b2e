"""k-th largest magnitude on the host (NumPy introselect, O(n)): the threshold of a magnitude trim.

The NumPy twins of :func:`sparsify.kth_largest` and :func:`sparsify.num_kept`, with the same float32
arithmetic so that the host and the device keep exactly the same entries. Imports no JAX.
"""

from __future__ import annotations

import numpy as np


def host_kth_largest(values: np.ndarray, k: int, *, overwrite: bool = False) -> np.float32:
    """NumPy twin of :func:`kth_largest` (introselect, O(n)); ``overwrite`` partitions in place.

    Used inside the traced function through a callback, and by the merge command, which computes TIES
    thresholds on the host while reading the next tensor and passes them as ``threshold``.
    """
    flat = np.asarray(values).reshape(-1)
    k = int(k)
    if k <= 0:
        return np.float32(np.inf)
    if overwrite and flat.flags.writeable:
        flat.partition(flat.size - k)
        return np.float32(flat[flat.size - k])
    return np.float32(np.partition(flat, flat.size - k)[flat.size - k])


def host_num_kept(density: float, n: int) -> int:
    """NumPy twin of :func:`num_kept` (same float32 arithmetic, so host and device agree)."""
    k = np.floor(np.float32(density) * np.float32(n) * np.float32(1.0 + 1e-6))
    return int(np.clip(k, 0, n))
