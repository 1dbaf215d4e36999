"""Closed-form gradient flows used as oracles, and pytree comparison helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from gflow import optimizers


def tree_allclose(a, b, *, rtol=0.0, atol=0.0) -> bool:
    """Whether two pytrees have the same structure and close leaves."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def tree_max_abs_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# --- Quadratic loss ½(θ−θ*)ᵀA(θ−θ*) on a nested pytree of mixed shapes -------------
# θ is flattened in jax.tree.leaves order; the flow is θ(t) = θ* + expm(−tA)(θ0 − θ*).

QUADRATIC_PARAMS0 = {
    "layer": {"w": np.array([[1.0, -0.5], [0.25, 2.0]]), "b": np.array([0.3])},
    "scale": (np.array(-1.0), [np.array([0.5, -0.7, 0.1])]),
}


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _unflat(vector, like):
    leaves, treedef = jax.tree.flatten(like)
    out, i = [], 0
    for leaf in leaves:
        size = int(np.size(leaf))
        out.append(jnp.reshape(vector[i : i + size], np.shape(leaf)))
        i += size
    return jax.tree.unflatten(treedef, out)


def quadratic_problem(seed: int = 0):
    """(loss, data, params0, exact(t)); A is random SPD, eigenvalues in [0.2, 5]."""
    params0 = jax.tree.map(jnp.asarray, QUADRATIC_PARAMS0)
    n = _flat(params0).size
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = q @ np.diag(np.linspace(0.2, 5.0, n)) @ q.T
    target = rng.normal(size=n)
    data = {"A": jnp.asarray(A), "target": jnp.asarray(target)}

    def loss(params, data):
        r = _flat(params) - data["target"]
        return 0.5 * r @ data["A"] @ r

    theta0 = np.asarray(_flat(params0))

    def exact(t):
        theta = target + scipy.linalg.expm(-t * A) @ (theta0 - target)
        return _unflat(jnp.asarray(theta), params0)

    return loss, data, params0, exact


# --- Chen & Luo stage 2: dW_Q/dt = F W_K, dW_K/dt = Fᵀ W_Q --------------------------
# This is the gradient flow of L = −tr(W_Qᵀ F W_K). With F = U Σ Vᵀ,
# W_Q(t) = U[cosh(Σt) Uᵀ W_Q(0) + sinh(Σt) Vᵀ W_K(0)],
# W_K(t) = V[sinh(Σt) Uᵀ W_Q(0) + cosh(Σt) Vᵀ W_K(0)].


def stage2_problem(d: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(d, d)) / d
    params0 = {
        "W_Q": rng.normal(size=(d, d)) * 0.1,
        "W_K": rng.normal(size=(d, d)) * 0.1,
    }

    def loss(params, F):
        return -jnp.trace(params["W_Q"].T @ F @ params["W_K"])

    U, s, Vt = np.linalg.svd(F)
    V = Vt.T

    def exact(t):
        c, sh = np.diag(np.cosh(s * t)), np.diag(np.sinh(s * t))
        q0, k0 = params0["W_Q"], params0["W_K"]
        return {
            "W_Q": U @ (c @ U.T @ q0 + sh @ V.T @ k0),
            "W_K": V @ (sh @ U.T @ q0 + c @ V.T @ k0),
        }

    return loss, jnp.asarray(F), jax.tree.map(jnp.asarray, params0), exact


# --- Makkuva et al. canonical (e, w) model with the optimal bias --------------------
# Written out literally from papers.md, as an oracle for gflow.models.MarkovCanonical.


def markov_reduced_loss(p: float, q: float):
    """L(e, w) = L(e, w, b*(e, w)) for the chain P = [[1−p, p], [q, 1−q]]."""
    pi1, pi0 = p / (p + q), q / (p + q)

    def loss(params, data):
        e, w = params["e"], params["w"]
        a = (1 + 2 * w * jnp.abs(w)) * e**2
        b = e**2 / 2 + jnp.log(
            (p - q + jnp.sqrt((p - q) ** 2 + 4 * p * q * jnp.exp(a)))
            / (2 * q * jnp.exp(a))
        )
        f1 = e**2 * (0.5 + 2 * w * jnp.abs(w)) + b
        f0 = b - e**2 / 2
        ls = jax.nn.log_sigmoid
        return -pi1 * (q * ls(-f1) + (1 - q) * ls(f1)) - pi0 * (
            p * ls(f0) + (1 - p) * ls(-f0)
        )

    return loss


#: Each optimiser as `make(lr, eps)` with the ε its edge tests use: None for
#: gradient descent and momentum (P = 1); for the adaptive methods a huge ε
#: freezes the preconditioner (√v̂ ≪ ε while the iterates stay small), so that
#: they are their momentum recurrences with P = ε.
FROZEN_PRECONDITIONERS = [
    pytest.param(lambda lr, eps: optimizers.GD(lr), None, id="GD"),
    pytest.param(lambda lr, eps: optimizers.HeavyBall(lr, 0.9), None, id="HeavyBall"),
    pytest.param(lambda lr, eps: optimizers.Nesterov(lr, 0.9), None, id="Nesterov"),
    pytest.param(
        lambda lr, eps: optimizers.RMSProp(lr, 0.9, eps, eps_in_sqrt=False),
        1e4,
        id="RMSProp",
    ),
    pytest.param(
        lambda lr, eps: optimizers.RMSProp(lr, 0.9, eps**2), 1e4, id="RMSProp-in-sqrt"
    ),
    pytest.param(lambda lr, eps: optimizers.Adam(lr, 0.9, 0.999, eps), 1e4, id="Adam"),
    pytest.param(
        lambda lr, eps: optimizers.NAdam(lr, 0.8, 0.999, eps), 1e4, id="NAdam"
    ),
]
