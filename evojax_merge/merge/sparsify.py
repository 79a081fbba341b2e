"""Sparsifiers: the first stage of every task-vector merge (sparsify -> weight -> sign-elect -> combine).

Each sparsifier maps one task vector ``tau`` (any shape) and a density ``d`` (a traced scalar, so a
genome can evolve it) to a tensor of the same shape where only the kept entries are non-zero:

- :func:`magnitude` — keep the top-``d`` fraction by magnitude (TIES-Merging, Yadav et al., 2023).
- :func:`random_drop` — keep each entry with probability ``d`` and rescale (DARE, Yu et al., 2024).
- :func:`magnitude_outliers` — drop the top-``gamma`` fraction and the smallest so that ``d`` remains
  (Model Breadcrumbs, Davari & Belilovsky, 2024).
- :func:`della_magprune` — keep-probabilities ranked by magnitude in a band ``d +- epsilon`` per row,
  rescale (DELLA-Merging, Deep et al., 2024).

Rescaling conventions (``rescale``): ``"density"`` divides survivors by their keep probability (the
papers; unbiased in expectation), ``"l1"`` rescales so the L1 norm of the tensor is preserved (what
mergekit >= 0.1 does), ``"none"`` keeps survivors as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from evojax_merge.merge.registry import RESCALE_CONVENTIONS
from evojax_merge.merge.selection import host_kth_largest


# How the k-th largest magnitude is found. XLA:CPU has no selection primitive and sorting a 28M-entry
# embedding takes ~13 s there, so on CPU we call NumPy's O(n) introselect through a callback; on
# accelerators (where sort is fast and callbacks are not) we use a 31-step bisection on the float bits.
# "auto" picks by backend at trace time.
SELECTION = "auto"


def num_kept(density, n: int):
    """Number of entries a density keeps: ``floor(d * n)``, like mergekit, tolerant to float32 rounding.

    Args:
      density: scalar density in [0, 1] (may be traced).
      n: number of entries of the tensor (static).

    Returns:
      int32 scalar in [0, n].
    """
    # float32(0.7) * 10 = 6.9999999: nudge by a relative 1e-6 so d * n lands where float64 puts it.
    k = jnp.floor(jnp.asarray(density, jnp.float32) * n * (1.0 + 1e-6))
    return jnp.clip(k, 0, n).astype(jnp.int32)


def _kth_largest_host(values, k) -> np.ndarray:
    return np.asarray(host_kth_largest(values, k), np.float32)


def _kth_largest_bisect(values: jax.Array, k) -> jax.Array:
    # For non-negative float32 the int32 bit pattern orders like the value: bisect on bits for the
    # largest b with count(bits >= b) >= k; each step is one fused compare-and-count pass.
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32).ravel()

    def step(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, step, (jnp.int32(0), jnp.int32(0x7F800001)))
    value = jax.lax.bitcast_convert_type(lo, jnp.float32)
    return jnp.where(k <= 0, jnp.inf, value)


def kth_largest(values: jax.Array, k) -> jax.Array:
    """The k-th largest entry of a non-negative array (``+inf`` when ``k == 0``).

    Args:
      values: non-negative array of any shape (magnitudes).
      k: int scalar in [0, values.size] (may be traced).

    Returns:
      float32 scalar threshold t such that ``values >= t`` keeps exactly the top k (up to ties).
    """
    values = values.astype(jnp.float32)
    k = jnp.asarray(k, jnp.int32)
    method = SELECTION
    if method == "auto":
        method = "host" if jax.default_backend() == "cpu" else "bisect"
    if method == "host":
        return jax.pure_callback(
            _kth_largest_host,
            jax.ShapeDtypeStruct((), jnp.float32),
            values,
            k,
            vmap_method="sequential",
        )
    return _kth_largest_bisect(values, k)


def rescale_kept(tau: jax.Array, kept: jax.Array, keep_prob, rescale: str) -> jax.Array:
    """Applies a keep mask and one of the rescaling conventions.

    Args:
      tau: the dense task vector.
      kept: boolean mask of the same shape.
      keep_prob: probability each entry was kept (scalar or same shape), used by ``"density"``.
      rescale: ``"density"`` (divide by keep_prob), ``"l1"`` (preserve the L1 norm) or ``"none"``.

    Returns:
      The sparsified task vector.
    """
    masked = jnp.where(kept, tau, 0.0)
    if rescale == "none":
        return masked
    if rescale == "density":
        # keep_prob == 0 means nothing survives: avoid 0/0.
        safe = jnp.where(keep_prob > 0, keep_prob, 1.0)
        return masked / safe
    if rescale == "l1":
        before = jnp.sum(jnp.abs(tau))
        after = jnp.sum(jnp.abs(masked))
        # Same guard as mergekit: leave (near) empty tensors alone instead of dividing by ~0.
        ok = (before >= 1e-7) & (after >= 1e-7)
        return masked * jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0)
    raise ValueError(f"unknown rescale convention {rescale!r}; expected one of {RESCALE_CONVENTIONS}")


def magnitude(
    tau: jax.Array, density, key=None, *, rescale: str = "none", threshold=None
) -> jax.Array:
    """Keeps the ``floor(d * n)`` largest-magnitude entries (the "trim" step of TIES-Merging).

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.

    Args:
      tau: task vector, any shape.
      density: fraction kept, scalar in [0, 1]; ``>= 1`` keeps everything.
      key: unused (uniform signature).
      rescale: rescaling convention (default none, as in the paper).
      threshold: the k-th largest magnitude if already known (e.g. computed on the host with
        :func:`host_kth_largest`); None computes it.

    Returns:
      The trimmed task vector.
    """
    del key
    magnitudes = jnp.abs(tau)
    if threshold is None:
        threshold = kth_largest(magnitudes, num_kept(density, tau.size))
    kept = (magnitudes >= threshold) | (density >= 1)
    return rescale_kept(tau, kept, jnp.minimum(density, 1.0), rescale)


def derive_key(key: jax.Array, index, word: int = 1) -> jax.Array:
    """A key for sub-stream ``index`` (a tensor, a model): ``index`` mixed into one word of the key.

    The cheap stand-in for ``jax.random.fold_in``: each ``fold_in`` is a threefry evaluation, and
    XLA:CPU takes ~0.1 s to compile each one, which adds up to seconds for a merge over hundreds of
    tensors. The derived keys only seed :func:`uniform_bits`, whose hash decorrelates them; tensors use
    word 1 and models word 0, so (tensor, model) pairs map to distinct seed pairs.

    Args:
      key: a typed PRNG key or raw key data (uint32 words).
      index: int (may be traced).
      word: which word of the key data to mix the index into.

    Returns:
      A typed key of the same implementation.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    data = jax.random.key_data(key)
    # Multiplying by an odd constant is a bijection mod 2^32: distinct indices give distinct words.
    mix = jnp.asarray(index, jnp.uint32) * jnp.uint32(0x9E3779B9 if word == 0 else 0x85EBCA77)
    data = data.at[word].set(data[word] ^ mix.astype(data.dtype))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def uniform_bits(key: jax.Array, shape) -> jax.Array:
    """Counter-based uint32 noise: two rounds of the murmur3 finaliser over (index, key).

    ``jax.random.uniform`` (threefry) costs ~18 ns per entry on CPU, which would dominate a DARE merge
    of a 135M-parameter model; this hash is a few fused integer ops per entry and is reproducible for a
    key. It is only used for Bernoulli masks, where its statistical quality is ample.

    Args:
      key: a JAX PRNG key (typed or raw uint32[2]).
      shape: output shape.

    Returns:
      uint32 array of the given shape.
    """
    # The key's own words seed the hash: drawing them with jax.random.bits would add a threefry
    # evaluation per tensor and model, which dominates compile time of a many-tensor merge.
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    seeds = data.reshape(-1)[:2].astype(jnp.uint32)
    n = int(np.prod(shape)) if len(shape) else 1
    h = jax.lax.iota(jnp.uint32, n) * jnp.uint32(0x9E3779B9) ^ seeds[0]
    for _ in range(2):
        h = h ^ (h >> 16)
        h = h * jnp.uint32(0x85EBCA6B)
        h = h ^ (h >> 13)
        h = h * jnp.uint32(0xC2B2AE35)
        h = h ^ (h >> 16)
        h = h + seeds[1]
    return h.reshape(shape)


def bernoulli_mask(key: jax.Array, keep_prob, shape) -> jax.Array:
    """Boolean mask, True with probability ``keep_prob`` (scalar or array of ``shape``), reproducible."""
    # Top 24 bits as a uniform in [0, 1) with float32-exact steps of 2^-24.
    u = (uniform_bits(key, shape) >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
    return u < keep_prob


def random_drop(tau: jax.Array, density, key: jax.Array, *, rescale: str = "density") -> jax.Array:
    """DARE: drop each entry with probability ``1 - d``, rescale the survivors.

    Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
    Lunch", ICML 2024. ``rescale="density"`` is the paper's 1/d (unbiased in expectation); ``"l1"`` is
    mergekit's norm-preserving variant.

    Args:
      tau: task vector, any shape.
      density: keep probability d in [0, 1]; ``>= 1`` keeps everything untouched.
      key: PRNG key; the same key gives the same mask.
      rescale: ``"density"``, ``"l1"`` or ``"none"``.

    Returns:
      The sparsified task vector.
    """
    density = jnp.clip(jnp.asarray(density, jnp.float32), 0.0, 1.0)
    kept = bernoulli_mask(key, density, tau.shape)
    return jnp.where(density >= 1, tau, rescale_kept(tau, kept, density, rescale))


def magnitude_outliers(
    tau: jax.Array, density, key=None, *, gamma=0.01, rescale: str = "none"
) -> jax.Array:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction and the smallest, keeping ``d``.

    Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", 2024.
    In descending magnitude order the kept ranks are ``[n_top, n_top + k)`` with ``k = floor(d n)`` and
    ``n_top = floor(gamma n)``, lowered when needed so that exactly ``k`` remain (as mergekit).

    Args:
      tau: task vector, any shape.
      density: fraction kept, in [0, 1]; ``>= 1`` keeps everything.
      key: unused.
      gamma: fraction of largest-magnitude outliers removed.
      rescale: rescaling convention.

    Returns:
      The sparsified task vector.
    """
    del key
    n = tau.size
    k = num_kept(density, n)
    n_top = jnp.minimum(num_kept(gamma, n), n - k)
    magnitudes = jnp.abs(tau)
    upper = kth_largest(magnitudes, n_top)  # +inf when nothing is cut at the top
    lower = kth_largest(magnitudes, n_top + k)
    kept = ((magnitudes < upper) & (magnitudes >= lower) & (k > 0)) | (density >= 1)
    return rescale_kept(tau, kept, jnp.minimum(density, 1.0), rescale)


def della_magprune(
    tau: jax.Array, density, key: jax.Array, *, epsilon=0.15, rescale: str = "density"
) -> jax.Array:
    """DELLA MagPrune: keep-probability rises linearly with magnitude rank inside ``d +- epsilon``.

    Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
    Sampling", 2024. Ranks are taken per row (the first axis; a vector is one row): the smallest entry of
    a row gets ``d - epsilon``, the largest ``d + epsilon``; probabilities are clipped to [0, 1].
    ``rescale="density"`` divides each survivor by its own keep probability (the paper).

    Args:
      tau: task vector, any shape.
      density: mean keep probability d in [0, 1]; ``>= 1`` keeps everything.
      key: PRNG key.
      epsilon: half-width of the probability band.
      rescale: rescaling convention.

    Returns:
      The sparsified task vector.
    """
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau.reshape(tau.shape[0], -1)
    width = rows.shape[1]
    ranks = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=1), axis=1).astype(jnp.float32)
    rank01 = ranks / max(width - 1, 1)
    probs = jnp.clip(density - epsilon + 2.0 * epsilon * rank01, 0.0, 1.0)
    kept = bernoulli_mask(key, probs, rows.shape)
    out = rescale_kept(rows, kept, probs, rescale).reshape(tau.shape)
    return jnp.where(density >= 1, tau, jnp.where(density <= 0, 0.0, out))


SPARSIFIERS = {
    "magnitude": magnitude,
    "random": random_drop,
    "magnitude_outliers": magnitude_outliers,
    "della_magprune": della_magprune,
}
