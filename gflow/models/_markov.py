"""Local to global: single-layer transformers on binary Markov chains.

Makkuva, Bondaschi et al., "Local to Global: Learning Dynamics and Effect of
Initialization for Transformers", NeurIPS 2024 (arXiv 2406.03072).

The data are binary first-order Markov chains with transition matrix
`P = [[1 − p, p], [q, 1 − q]]` (p = P(0→1), q = P(1→0)); the task is next-token
prediction with binary cross-entropy. The unigram predictor (the stationary law) is a
local minimum with loss H(π); the bigram predictor is the global minimum with loss
the entropy rate. Which one gradient flow reaches depends on the initialisation and
on whether p + q > 1.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import require, require_int, require_positive, require_probability
from ._base import AbstractExampleModel, AbstractModel

#: E on the separatrix of the canonical (e, w) flow: E(saddle) = −(1 + log 2) / 2.
MARKOV_SEPARATRIX_ENERGY = -(1.0 + math.log(2.0)) / 2.0


def markov_reference_losses(p: float, q: float) -> tuple[float, float]:
    """The unigram loss H(π) (local minimum) and the entropy rate (global minimum).

    In nats. π = (q, p) / (p + q) is the stationary law; the entropy rate is
    π0 h(p) + π1 h(q) with h the binary entropy.

    Examples:
        >>> gflow.models.markov_reference_losses(0.5, 0.8)
        (0.6662784..., 0.6190145...)
    """
    require_probability("p", p)
    require_probability("q", q)
    pi1, pi0 = p / (p + q), q / (p + q)

    def h(x):
        return -x * math.log(x) - (1 - x) * math.log(1 - x)

    return h(pi1), pi0 * h(p) + pi1 * h(q)


def markov_energy(e, w):
    """E(e, w) = e² − w² − sign(w) log|w|, conserved by the canonical (e, w) flow.

    Its level set E = `MARKOV_SEPARATRIX_ENERGY` through the saddle (0, −1/√2) is the
    separatrix between the basins of the two minima (w = 0 is invariant: E = ±inf).
    """
    return e**2 - w**2 - jnp.sign(w) * jnp.log(jnp.abs(w))


def markov_data(key, p: float, q: float, *, n_seqs: int, seq_len: int) -> jax.Array:
    """`n_seqs` binary sequences of length `seq_len` from the chain (p, q).

    The first symbol is drawn from the stationary law π1 = p / (p + q), so every
    position has the stationary marginal.

    Returns:
        An int32 array of shape `(n_seqs, seq_len)` with entries 0 and 1.
    """
    require_probability("p", p)
    require_probability("q", q)
    require_int("n_seqs", n_seqs, 1)
    require_int("seq_len", seq_len, 2)
    k_first, k_steps = jax.random.split(key)
    first = jax.random.bernoulli(k_first, p / (p + q), (n_seqs,))
    uniforms = jax.random.uniform(k_steps, (seq_len - 1, n_seqs))

    def step(x, u):
        nxt = jnp.where(
            x, u >= q, u < p
        )  # from 1: stay with 1 − q; from 0: jump w.p. p
        return nxt, nxt

    _, rest = jax.lax.scan(step, first, uniforms)
    return jnp.concatenate([first[:, None], rest.T], axis=1).astype(jnp.int32)


def _binary_cross_entropy(logits, targets):
    return -(
        targets * jax.nn.log_sigmoid(logits)
        + (1 - targets) * jax.nn.log_sigmoid(-logits)
    )


class MarkovCanonical(AbstractModel):
    """The canonical reduced model θ = (e, w) of Makkuva et al., exact expected loss.

    Logits after a 1 and after a 0: `f1 = e²(½ + 2w|w|) + b`, `f0 = b − e²/2`, and
    the exact expected next-token loss (so `data` is None)
    `L(e, w, b) = −π1 [q log σ(−f1) + (1−q) log σ(f1)]
    − π0 [p log σ(f0) + (1−p) log σ(−f0)]`. With
    `train_bias=False` (default) the bias is the closed-form optimum `b*(e, w)` and
    the flow conserves `markov_energy(e, w)`; with `train_bias=True` the bias is a
    third parameter `b` trained jointly (no conserved energy then).

    Attributes:
        p: the chain's switching probability P(0 → 1), in (0, 1).
        q: the chain's switching probability P(1 → 0), in (0, 1).
        train_bias: train `b` instead of using `b*(e, w)` (keyword only).
        init_scale: standard deviation of the Gaussian `init` (near the origin).

    Examples:
        >>> model = gflow.models.MarkovCanonical(0.5, 0.8)
        >>> traj = gflow.simulate(model, None, 2000.0,
        ...                       params0={"e": jnp.array(0.1), "w": jnp.array(-1.0)})
        >>> float(traj.loss[-1])      # the entropy rate 0.61901
    """

    p: float
    q: float
    train_bias: bool = eqx.field(default=False, kw_only=True)
    init_scale: float = eqx.field(default=0.1, kw_only=True)

    def __check_init__(self):
        require_probability("p", self.p)
        require_probability("q", self.q)
        require_positive("init_scale", self.init_scale)

    @property
    def stationary(self) -> tuple[float, float]:
        """(π0, π1)."""
        return self.q / (self.p + self.q), self.p / (self.p + self.q)

    def init(self, key):
        k_e, k_w = jax.random.split(key)
        params = {
            "e": self.init_scale * jax.random.normal(k_e, ()),
            "w": self.init_scale * jax.random.normal(k_w, ()),
        }
        if self.train_bias:
            params["b"] = jnp.zeros(())
        return params

    def optimal_bias(self, e, w):
        """b*(e, w) = e²/2 + log[(p − q + √((p−q)² + 4pq e^A)) / (2q e^A)].

        A = (1 + 2w|w|) e². Evaluated in log space without cancellation or
        overflow (the two algebraically equal forms, chosen by the sign of p − q).
        """
        p, q = self.p, self.q
        a = (1 + 2 * w * jnp.abs(w)) * e**2
        log_diff_sq = 2 * math.log(abs(p - q)) if p != q else -jnp.inf
        log_s = 0.5 * jnp.logaddexp(log_diff_sq, math.log(4 * p * q) + a)
        if p >= q:
            log_num = jnp.logaddexp(math.log(p - q), log_s) if p > q else log_s
            return e**2 / 2 + log_num - math.log(2 * q) - a
        return e**2 / 2 + math.log(2 * p) - jnp.logaddexp(log_s, math.log(q - p))

    def reaches_global(self, e, w):
        """Whether the flow from (e, w) ends at the global (bigram) minimum, from the
        phase portrait of Makkuva et al. (exact for `e != 0`, `w != 0`).

        The energy `E = markov_energy(e, w)` is conserved, so each flow stays on a
        level curve; `E = MARKOV_SEPARATRIX_ENERGY` is the separatrix through the
        saddle (0, −1/√2). For p + q > 1 the flow goes to the unigram local minimum
        from `w > 0`, and from `−1/√2 < w < 0` below the separatrix energy; for
        p + q < 1 from `w < −1/√2` below the separatrix energy. Everywhere else it
        goes to the global minimum.
        """
        e, w = jnp.asarray(e), jnp.asarray(w)
        below = markov_energy(e, w) < MARKOV_SEPARATRIX_ENERGY
        saddle_w = -1 / math.sqrt(2)
        if self.p + self.q > 1:
            local = (w > 0) | ((w < 0) & (w > saddle_w) & below)
        else:
            local = (w < saddle_w) & below
        return ~local

    def logits(self, params):
        """(f0, f1): the logits of the next symbol being 1 after a 0 and after a 1."""
        e, w = params["e"], params["w"]
        b = params["b"] if self.train_bias else self.optimal_bias(e, w)
        return b - e**2 / 2, e**2 * (0.5 + 2 * w * jnp.abs(w)) + b

    def loss(self, params, data=None):
        if data is not None:
            raise TypeError(
                "MarkovCanonical's loss is the exact expected loss over the chain; "
                "pass data=None."
            )
        pi0, pi1 = self.stationary
        f0, f1 = self.logits(params)
        # After a 0 the next symbol is 1 w.p. p; after a 1 it is 1 w.p. 1 − q.
        bce = _binary_cross_entropy
        after_0 = self.p * bce(f0, 1.0) + (1 - self.p) * bce(f0, 0.0)
        after_1 = (1 - self.q) * bce(f1, 1.0) + self.q * bce(f1, 0.0)
        return pi0 * after_0 + pi1 * after_1


class MarkovTransformer(AbstractExampleModel):
    """The single-layer, single-head transformer of Makkuva et al. (their code).

    For a binary sequence x_1..x_N:

    * embedding `h_n = x_n e + p_n` (token 0 embeds to zero; `e`, `p_n` in R^d);
    * causal softmax attention scaled by 1/√d, no output projection, residual:
      `z = h + softmax(h W_Qᵀ (h W_Kᵀ)ᵀ / √d, causal) h W_Vᵀ`;
    * MLP `W_proj ReLU(W_fc z)` (d → 4d → d, no biases), residual:
      `z' = z + W_proj ReLU(W_fc z)`; no LayerNorm;
    * weight-tied readout `logit_n = ⟨e, z'_n⟩ + b`, binary cross-entropy of
      σ(logit_n) against x_{n+1}.

    Initialisations:

    * `"gaussian"`: every weight N(0, `init_std`²) (GPT-2's 0.02 by default), b = 0.
      For p + q > 1 its flow goes to the unigram local minimum.
    * `"makkuva"`: their proposed init: e ≡ 0.5 in every entry, p_n ≡ −e/2,
      W_fc ≡ +c, W_proj ≡ −c, attention weights as in `"gaussian"`, b = 0. Their code
      uses c = 1; we take c = 1/d, which puts the canonical w at exactly −1 for every
      d (with c = 1 the canonical w is −d, far outside the regime their analysis
      describes). Its flow goes to the bigram global minimum.

    Data: an int array `(n_seqs, seq_len)` of 0/1 (see `markov_data`).
    Parameters: `{"e", "pos", "W_Q", "W_K", "W_V", "W_fc", "W_proj", "b"}`.

    Examples:
        >>> model = gflow.models.MarkovTransformer(d=8, seq_len=32, init="makkuva")
        >>> data = gflow.models.markov_data(jax.random.key(0), 0.5, 0.8, n_seqs=256,
        ...                                   seq_len=32)
        >>> traj = gflow.simulate(model, data, 500.0, key=1)
    """

    d: int
    seq_len: int
    init_scheme: str
    init_std: float

    def __init__(
        self,
        *,
        d: int = 8,
        seq_len: int = 32,
        init: str = "gaussian",
        init_std: float = 0.02,
    ):
        require_int("d", d, 1)
        require_int("seq_len", seq_len, 2)
        require(
            init in ("gaussian", "makkuva"),
            f"`init` must be 'gaussian' or 'makkuva'; got {init!r}.",
        )
        require_positive("init_std", init_std)
        self.d, self.seq_len, self.init_scheme, self.init_std = (
            d,
            seq_len,
            init,
            init_std,
        )

    def init(self, key):
        d = self.d
        keys = jax.random.split(key, 7)

        def gaussian(k, shape):
            return self.init_std * jax.random.normal(k, shape)

        params = {
            "e": gaussian(keys[0], (d,)),
            "pos": gaussian(keys[1], (self.seq_len, d)),
            "W_Q": gaussian(keys[2], (d, d)),
            "W_K": gaussian(keys[3], (d, d)),
            "W_V": gaussian(keys[4], (d, d)),
            "W_fc": gaussian(keys[5], (4 * d, d)),
            "W_proj": gaussian(keys[6], (d, 4 * d)),
            "b": jnp.zeros(()),
        }
        if self.init_scheme == "makkuva":
            e = jnp.full((d,), 0.5)
            params.update(
                e=e,
                pos=jnp.broadcast_to(-e / 2, (self.seq_len, d)),
                W_fc=jnp.full((4 * d, d), 1.0 / d),
                W_proj=jnp.full((d, 4 * d), -1.0 / d),
            )
        return params

    def logits(self, params, tokens):
        """Next-symbol logits at every position of one sequence, shape `(seq_len,)`."""
        x = tokens.astype(params["e"].dtype)
        h = x[:, None] * params["e"] + params["pos"]
        q, k, v = h @ params["W_Q"].T, h @ params["W_K"].T, h @ params["W_V"].T
        scores = q @ k.T / math.sqrt(self.d)
        causal = np.tril(np.ones((self.seq_len, self.seq_len), dtype=bool))
        attention = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        z = h + attention @ v
        z = z + jax.nn.relu(z @ params["W_fc"].T) @ params["W_proj"].T
        return z @ params["e"] + params["b"]

    def per_example_loss(self, params, data):
        """Mean next-token cross-entropy of each sequence, shape `(n_seqs,)`."""
        if data.ndim != 2 or data.shape[1] != self.seq_len:
            raise ValueError(
                f"data must have shape (n_seqs, seq_len={self.seq_len}); "
                f"got {data.shape}."
            )
        logits = jax.vmap(self.logits, in_axes=(None, 0))(params, data)
        targets = data[:, 1:].astype(logits.dtype)
        return jnp.mean(_binary_cross_entropy(logits[:, :-1], targets), axis=1)
