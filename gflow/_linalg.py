"""Linear algebra on pytrees: Hessian-vector products and the top eigenvalues of a
symmetric linear map (power iteration). A leaf apart from `_tree`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._tree import tree_combination, tree_dot, tree_norm, tree_unit


def hvp(loss: Callable, params: Any, data: Any, v: Any) -> Any:
    """The Hessian of `loss(·, data)` at `params` applied to `v` (forward over
    reverse: one forward-mode derivative of the gradient)."""
    return jax.jvp(lambda p: jax.grad(loss)(p, data), (params,), (v,))[1]


def power_iteration(
    apply: Callable[[Any], Any], v: Any, max_iters: int | jax.Array, rtol: float = 0.0
) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
    """The eigenvalue of largest magnitude of a symmetric linear map, by power
    iteration: `(Rayleigh quotient q, unit vector v, applications of the map,
    residual ‖Av − q v‖)`.

    Each iteration applies the map once. It stops after `max_iters` iterations, or
    once the residual is at most `rtol |q|`: then an eigenvalue lies within
    `rtol |q|` of q. (A test on the change of q alone stops too early when the top
    two eigenvalues are close.) `|q| + residual` bounds the top eigenvalue from above
    once v lies mostly in the span of the top eigenvectors. Warm-start it with the
    previous vector (`v`) when the map changes slowly, as it does along a flow.

    Examples:
        >>> a = jnp.diag(jnp.array([3.0, 1.0]))
        >>> q, v, count, residual = gflow.metrics.power_iteration(
        ...     lambda x: a @ x, jnp.ones(2), 100, rtol=1e-6)
        >>> round(float(q), 4)
        3.0
    """

    def cond(carry):
        i, value, residual, _ = carry
        return (i < max_iters) & ((i < 1) | (residual > rtol * jnp.abs(value)))

    def body(carry):
        i, _, _, v = carry
        w = apply(v)
        quotient = tree_dot(v, w)
        residual = tree_norm(tree_combination((1.0, w), (-quotient, v)))
        return i + 1, quotient, residual, tree_unit(w)

    dtype = jnp.result_type(*jax.tree.leaves(v))
    start = (
        jnp.zeros((), jnp.int32),
        jnp.asarray(jnp.inf, dtype),
        jnp.asarray(jnp.inf, dtype),
    )
    count, value, residual, v = jax.lax.while_loop(cond, body, (*start, tree_unit(v)))
    return value, v, count, residual
