"""Diagnostics of parameters along a trajectory: ranks, condensation, drift.

Pure JAX functions of arrays, usable inside `simulate(..., metrics=...)` (wrap them
as `lambda params, data: effective_rank(params["W_Q"])`) or on a saved trajectory
(`jax.vmap(effective_rank)(traj.params["W_Q"])`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def effective_rank(matrix: jax.Array) -> jax.Array:
    """The entropy effective rank of Roy & Vetterli (2007).

    `exp(−Σ p_i log p_i)` with `p_i = σ_i / Σ_j σ_j` the normalised singular values:
    1 for a rank-one matrix, n for a multiple of an n × n orthogonal matrix, and
    continuous in between. Scale-invariant, so it measures the rank of
    `W / ‖W‖_F`.

    Example:
        >>> gflow.metrics.effective_rank(jnp.eye(4))
        Array(4., dtype=float32)
    """
    s = jnp.linalg.svd(matrix, compute_uv=False)
    p = s / jnp.sum(s)
    # 0 log 0 = 0: singular values that are exactly zero contribute nothing.
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0)))


def stable_rank(matrix: jax.Array) -> jax.Array:
    """‖W‖_F² / ‖W‖_2²: between 1 (rank one) and the rank."""
    s = jnp.linalg.svd(matrix, compute_uv=False)
    return jnp.sum(s**2) / s[0] ** 2


def row_cosine_similarity(matrix: jax.Array) -> jax.Array:
    """The matrix of cosine similarities between the rows of `matrix`."""
    unit = matrix / jnp.linalg.norm(matrix, axis=-1, keepdims=True)
    return unit @ unit.T


def row_condensation(matrix: jax.Array) -> jax.Array:
    """Mean |cosine similarity| between distinct rows: near 1 when the rows have
    condensed onto ± one direction (Chen & Luo), near 0 for orthogonal rows.

    Example:
        >>> gflow.metrics.row_condensation(jnp.array([[1.0, 0.0], [-2.0, 0.0]]))
        Array(1., dtype=float32)
    """
    n = matrix.shape[0]
    cos = jnp.abs(row_cosine_similarity(matrix))
    return (jnp.sum(cos) - jnp.trace(cos)) / (n * (n - 1))


def relative_drift(x, x0) -> jax.Array:
    """‖x − x0‖ / ‖x0‖ over all leaves of two pytrees (or two arrays)."""
    diff = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), x, x0)
    base = jax.tree.map(lambda b: jnp.sum(b**2), x0)
    return jnp.sqrt(sum(jax.tree.leaves(diff)) / sum(jax.tree.leaves(base)))
