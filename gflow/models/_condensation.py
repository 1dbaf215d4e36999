"""From condensation to rank collapse: a small-initialisation transformer block.

Chen & Luo, "From Condensation to Rank Collapse: A Two-Stage Analysis of Transformer
Training Dynamics", NeurIPS 2025 (arXiv 2510.06954).

From a small initialisation N(0, ε²) the outer parameters (W_V, W1, W2) first escape
while W_Q, W_K stay put, and the rows of W_V and W1 condense onto ± one direction
(stage 1); then the key–query matrices move and W_Q / ‖W_Q‖_F collapses towards
rank one (stage 2).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import require, require_int, require_positive
from ._base import AbstractExampleModel, numpy_rng

ANCHORS = (1, 2, 3, 4)
KEYS = tuple(range(5, 101))


def anchor_data(
    key,
    *,
    n: int,
    d_m: int,
    s: int = 10,
    vocab: int = 201,
    embedding_seed: int = 0,
) -> dict[str, jax.Array]:
    """Chen & Luo's anchor-function task, as ±1 labels on embedded tokens.

    Each sequence has `s` tokens: keys drawn uniformly from 5..100, except for exactly
    one anchor a ∈ {1, 2, 3, 4} at a uniformly random position among the first s − 1.
    The paper's target is the token after the anchor plus (a mod 2), a number in
    5..101. The analysed model is a binary classifier with exponential loss, so the
    label is `y = +1` if that target lies in the upper half of its range (≥ 54) and
    `y = −1` otherwise (targets 5..53).

    Tokens are embedded by a fixed random matrix `E` (vocab × d_m, entries
    N(0, 1/d_m), drawn from `embedding_seed`): `X_i = E[tokens_i]`, one token per row.

    Returns:
        `{"X": (n, s, d_m), "y": (n,) ±1, "tokens": (n, s) int32, "target": (n,)}`.
    """
    require_int("n", n, 1)
    require_int("d_m", d_m, 1)
    require_int("s", s, 2)
    require_int("vocab", vocab, max(KEYS) + 2)
    rng = numpy_rng(key)
    tokens = rng.choice(KEYS, size=(n, s))
    positions = rng.integers(0, s - 1, size=n)
    anchors = rng.choice(ANCHORS, size=n)
    tokens[np.arange(n), positions] = anchors
    target = tokens[np.arange(n), positions + 1] + anchors % 2
    y = np.where(target >= 54, 1.0, -1.0)
    embedding = np.random.default_rng(embedding_seed).normal(
        0.0, 1.0 / math.sqrt(d_m), size=(vocab, d_m)
    )
    return {
        "X": jnp.asarray(embedding[tokens]),
        "y": jnp.asarray(y),
        "tokens": jnp.asarray(tokens, dtype=jnp.int32),
        "target": jnp.asarray(target, dtype=jnp.int32),
    }


class CondensationTransformer(AbstractExampleModel):
    """Chen & Luo's Definition 3: `f(X) = tanh(Attn(X) W1) W2` at the last position.

    `Attn(X) = softmax(X W_Q W_Kᵀ Xᵀ / √d_m) X W_V` with tokens as the rows of
    `X ∈ R^{s × d_m}`; only the last row (position s) feeds the output. Loss: the
    exponential loss `mean_i exp(−y_i f(X_i))`. All weights start N(0, ε²).

    Attributes:
        d_m: model width (W_Q, W_K, W_V, W1 are d_m × d_m, W2 has d_m entries).
        s: sequence length.
        eps: the initialisation scale ε (small: the regime the paper analyses).

    Data: `anchor_data(...)` or any `{"X": (n, s, d_m), "y": (n,)}`.
    Parameters: `{"W_Q", "W_K", "W_V", "W1", "W2"}`.

    Examples:
        >>> model = gflow.models.CondensationTransformer(d_m=16, s=10, eps=1e-3)
        >>> data = gflow.models.anchor_data(jax.random.key(0), n=128, d_m=16)
        >>> traj = gflow.simulate(model, data, 1e5, key=1)
    """

    d_m: int = eqx.field(kw_only=True)
    s: int = eqx.field(default=10, kw_only=True)
    eps: float = eqx.field(default=1e-3, kw_only=True)

    def __check_init__(self):
        require_int("d_m", self.d_m, 1)
        require_int("s", self.s, 2)
        require_positive("eps", self.eps)

    def init(self, key):
        d = self.d_m
        keys = jax.random.split(key, 5)
        shapes = {"W_Q": (d, d), "W_K": (d, d), "W_V": (d, d), "W1": (d, d), "W2": (d,)}
        return {
            name: self.eps * jax.random.normal(k, shape)
            for k, (name, shape) in zip(keys, shapes.items(), strict=True)
        }

    def _one_output(self, params, x):
        query = x[-1] @ params["W_Q"]
        scores = (x @ params["W_K"]) @ query / math.sqrt(self.d_m)
        attended = jax.nn.softmax(scores) @ (x @ params["W_V"])
        return jnp.tanh(attended @ params["W1"]) @ params["W2"]

    def output(self, params, data):
        """f(X_i) for every sample, shape `(n,)`."""
        x = data["X"]
        require(
            x.ndim == 3 and x.shape[1:] == (self.s, self.d_m),
            f"data['X'] must have shape (n, s={self.s}, d_m={self.d_m}); "
            f"got {x.shape}.",
        )
        return jax.vmap(self._one_output, in_axes=(None, 0))(params, x)

    def per_example_loss(self, params, data):
        """exp(−y_i f(X_i)), shape `(n,)`."""
        return jnp.exp(-data["y"] * self.output(params, data))

    @staticmethod
    def signal_direction(data):
        """v = u / ‖u‖ with u = Σ_i y_i Σ_j X_{i,j}: the direction W_V's rows follow."""
        u = jnp.einsum("i,isd->d", data["y"], data["X"])
        return u / jnp.linalg.norm(u)

    def stage1_balances(self, params, data):
        """The two quantities stage 1 conserves, each of shape `(d_m,)`.

        `(v W_V)_k² − Σ_k' W1[k, k']²` and `W2_k² − Σ_k' W1[k', k]²`, conserved by
        the leading-order (small-ε) dynamics; along the full flow they drift only at
        higher order in ε.
        """
        v = self.signal_direction(data)
        w1 = params["W1"]
        first = (v @ params["W_V"]) ** 2 - jnp.sum(w1**2, axis=1)
        second = params["W2"] ** 2 - jnp.sum(w1**2, axis=0)
        return first, second

    def stage2_matrix(self, params, data):
        """The matrix F driving stage 2: dW_Q/dt = F W_K, dW_K/dt = Fᵀ W_Q.

        `F = 1/(n s √d_m) Σ_i y_i L_i Σ_j (X_ij · c) X_isᵀ (X_ij − X̄_i)` with
        `c = W_V W1 W2`, `X̄_i` the mean token of sample i and
        `L_i = exp(−y_i X̄_i · c)` (papers.md, Chen & Luo stage 2).
        """
        x, y = data["X"], data["y"]
        n = x.shape[0]
        c = params["W_V"] @ params["W1"] @ params["W2"]
        mean = jnp.mean(x, axis=1, keepdims=True)
        weights = y * jnp.exp(-y * (mean[:, 0] @ c))  # y_i L_i
        coefficient = x @ c  # (n, s): X_ij · c
        inner = jnp.einsum(
            "ij,ijd->id", coefficient, x - mean
        )  # Σ_j (X_ij·c)(X_ij − X̄)
        f = jnp.einsum("i,id,ie->de", weights, x[:, -1], inner)
        return f / (n * self.s * math.sqrt(self.d_m))
