"""Word co-occurrence: a one-layer transformer learns whether two words co-occur.

Yang, Kailkhura, Wang & Liang, "Training Dynamics of Transformers to Recognize Word
Co-occurrence via Gradient Flow Analysis", NeurIPS 2024 (arXiv 2410.09605).

Words are the one-hot vectors µ_1..µ_d of R^d. In this module words are 0-based
token ids: `TARGET_1 = 0` is µ1, `TARGET_2 = 1` is µ2, `COMMON = 2` is µ3 (present in
every sequence), and ids 3..d−1 are the irrelevant filler words µ4..µd.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import require, require_int, require_ints, require_positive
from .._declarations import PhaseSpec
from ._base import AbstractExampleModel, numpy_rng

TARGET_1, TARGET_2, COMMON = 0, 1, 2
#: Sample groups of Definition 2.1: both targets (y = +1), µ1 only, µ2 only, neither.
GROUP_NAMES = ("I1 (both)", "I2 (µ1 only)", "I3 (µ2 only)", "I4 (neither)")
#: The attention scores of Yang et al.'s Fig. 1a: µ_iᵀ W_Kᵀ W_Q µ_j for (i, j).
ATTENTION_PAIRS = {
    "µ2ᵀ W_KᵀW_Q µ1": (TARGET_2, TARGET_1),
    "µ1ᵀ W_KᵀW_Q µ2": (TARGET_1, TARGET_2),
    "µ3ᵀ W_KᵀW_Q µ1": (COMMON, TARGET_1),
    "µ3ᵀ W_KᵀW_Q µ2": (COMMON, TARGET_2),
}


def cooccurrence_data(
    key: jax.Array | int,
    *,
    n: int,
    L: int,
    d: int,
    fillers: str = "random",
    exact_proportions: bool = True,
) -> dict[str, jax.Array]:
    """Samples of Yang et al.'s Definition 2.1.

    Each sample has L tokens: the common word µ3 at a uniformly random position;
    with probability 1/2 both targets µ1 and µ2 at two other distinct positions
    (y = +1, group I1), and with probability 1/6 each only µ1 (I2), only µ2 (I3) or
    neither (I4), all with y = −1; every other position holds a filler word.

    Args:
        key: a PRNG key.
        n: number of samples.
        L: sequence length (at least 3: the common word and two targets).
        d: vocabulary size (at least 4: three special words and one filler).
        fillers: `"random"` (default, as in their experiment): each filler uniform
            over µ4..µd; `"distinct"` (as in their theory): every filler token in
            the whole training set is a different word, which needs
            (number of filler slots) ≤ d − 3.
        exact_proportions: groups of exactly n/2, n/6, n/6, n/6 samples (rounded
            down, the remainder going to I1) instead of drawn at random; their
            experiment (n = 60) has 30, 10, 10, 10.

    Returns:
        `{"tokens": (n, L) int32, "y": (n,) ±1 float, "group": (n,) int32 in 0..3}`.
    """
    require_ints(n=(n, 1), L=(L, 3), d=(d, 4))
    require(
        fillers in ("random", "distinct"),
        f"`fillers` must be 'random' or 'distinct'; got {fillers!r}.",
    )
    rng = numpy_rng(key)
    if exact_proportions:
        sixth = n // 6
        group = np.repeat([0, 1, 2, 3], [n - 3 * sixth, sixth, sixth, sixth])
        rng.shuffle(group)
    else:
        group = rng.choice(4, size=n, p=[1 / 2, 1 / 6, 1 / 6, 1 / 6])
    n_special = 1 + (group == 0) * 2 + ((group == 1) | (group == 2))
    n_fill = int(np.sum(L - n_special))
    if fillers == "distinct":
        require(
            n_fill <= d - 3,
            f"fillers='distinct' needs at most d − 3 = {d - 3} filler slots, but "
            f"n = {n} sequences of length L = {L} have {n_fill}; raise d, lower n or "
            "L, or use fillers='random'.",
        )
        pool = iter(rng.permutation(np.arange(3, d))[:n_fill])
    tokens = np.empty((n, L), dtype=np.int32)
    for i in range(n):
        special = [COMMON] + {
            0: [TARGET_1, TARGET_2],
            1: [TARGET_1],
            2: [TARGET_2],
            3: [],
        }[int(group[i])]
        positions = rng.permutation(L)
        row = np.empty(L, dtype=np.int32)
        row[positions[: len(special)]] = special
        rest = positions[len(special) :]
        if fillers == "distinct":
            row[rest] = [next(pool) for _ in rest]
        else:
            row[rest] = rng.integers(3, d, size=len(rest))
        tokens[i] = row
    y = np.where(group == 0, 1.0, -1.0)
    return {
        "tokens": jnp.asarray(tokens),
        "y": jnp.asarray(y),
        "group": jnp.asarray(group, dtype=jnp.int32),
    }


class CooccurrenceTransformer(AbstractExampleModel):
    """Yang et al.'s one-layer transformer with a linear MLP and a fixed ±1 readout.

    `F(X) = Σ_l Σ_j a_j w_jᵀ W_V X softmax(Xᵀ W_Kᵀ W_Q x_l / √m)`: softmax attention
    over the L tokens for every query position l (summed, not averaged, over l),
    then the linear MLP W (rows w_j) and the fixed readout a ∈ {±1}^{m1}. Loss: the
    logistic loss ℓ(yF) = log(1 + e^{−yF}), averaged over samples.

    Trained: `W_Q, W_K, W_V` (m × d) and `W` (m1 × m). The readout `a` is drawn once
    from `readout_seed` (uniform ±1) and kept in the model, not in the parameters.

    Args:
        d: vocabulary size = embedding dimension (one-hot words).
        L: sequence length.
        m: attention width.
        m1: MLP width.
        init: `"paper"` (their Condition 1, default): W_Q, W_K, W_V ~ N(0, σ0²) with
            σ0 = 1/√(L m) and W ~ N(0, σ1²) with σ1 = 1/√m1; or `"kaiming"` (their
            experiment's wording): N(0, 1/fan_in), i.e. σ = 1/√d for the attention
            matrices and 1/√m for W.
        sigma0: the standard deviation of W_Q, W_K, W_V (overrides `init`'s).
        sigma1: the standard deviation of W (overrides `init`'s).
        readout_seed: seed of the fixed readout a.

    Data: `cooccurrence_data(...)`. Parameters: `{"W_Q", "W_K", "W_V", "W"}`.

    Examples:
        >>> model = gflow.models.CooccurrenceTransformer(d=64, L=5, m=128, m1=256)
        >>> data = gflow.models.cooccurrence_data(jax.random.key(0), n=60, L=5, d=64)
        >>> traj = gflow.simulate(model, data, 300.0, key=1)
    """

    d: int
    L: int
    m: int
    m1: int
    init_scheme: str
    sigma0: float
    sigma1: float
    readout: tuple[int, ...]

    def __init__(
        self,
        *,
        d: int,
        L: int,
        m: int,
        m1: int,
        init: str = "paper",
        sigma0: float | None = None,
        sigma1: float | None = None,
        readout_seed: int = 0,
    ):
        require_ints(d=(d, 4), L=(L, 3), m=(m, 1), m1=(m1, 1))
        require(
            init in ("paper", "kaiming"),
            f"`init` must be 'paper' or 'kaiming'; got {init!r}.",
        )
        if init == "paper":
            default0, default1 = 1 / math.sqrt(L * m), 1 / math.sqrt(m1)
        else:
            default0, default1 = 1 / math.sqrt(d), 1 / math.sqrt(m)
        self.sigma0 = default0 if sigma0 is None else sigma0
        self.sigma1 = default1 if sigma1 is None else sigma1
        require_positive("sigma0", self.sigma0)
        require_positive("sigma1", self.sigma1)
        require_int("readout_seed", readout_seed, 0)
        signs = np.random.default_rng(readout_seed).choice([-1, 1], size=m1)
        self.d, self.L, self.m, self.m1, self.init_scheme = d, L, m, m1, init
        self.readout = tuple(int(x) for x in signs)

    def init(self, key):
        k_q, k_k, k_v, k_w = jax.random.split(key, 4)
        shape = (self.m, self.d)
        return {
            "W_Q": self.sigma0 * jax.random.normal(k_q, shape),
            "W_K": self.sigma0 * jax.random.normal(k_k, shape),
            "W_V": self.sigma0 * jax.random.normal(k_v, shape),
            "W": self.sigma1 * jax.random.normal(k_w, (self.m1, self.m)),
        }

    def _a(self, dtype):
        return jnp.asarray(self.readout, dtype=dtype)

    def _one_output(self, params, tokens):
        q, k, v = (params[name][:, tokens] for name in ("W_Q", "W_K", "W_V"))
        # scores[l', l] = x_l'ᵀ W_Kᵀ W_Q x_l / √m; softmax over the keys l'.
        attention = jax.nn.softmax(k.T @ q / math.sqrt(self.m), axis=0)
        pooled = v @ jnp.sum(attention, axis=1)  # Σ_l W_V X softmax(·)_l
        return self._a(pooled.dtype) @ (params["W"] @ pooled)

    def output(self, params, data):
        """F(X_i) for every sample, shape `(n,)`."""
        tokens = data["tokens"]
        if tokens.ndim != 2 or tokens.shape[1] != self.L:
            raise ValueError(
                f"data['tokens'] must have shape (n, L={self.L}); got {tokens.shape}."
            )
        return jax.vmap(self._one_output, in_axes=(None, 0))(params, tokens)

    def per_example_loss(self, params, data):
        """ℓ(y_i F_i) = log(1 + exp(−y_i F_i)), shape `(n,)`."""
        return jax.nn.softplus(-data["y"] * self.output(params, data))

    def margins(self, params, data):
        """y_i F_i: positive where sample i is classified correctly."""
        return data["y"] * self.output(params, data)

    def gradient_weights(self, params, data):
        """Each sample's gradient weight g_i = −ℓ'(y_i F_i) = 1 / (1 + exp(y_i F_i))."""
        return jax.nn.sigmoid(-self.margins(params, data))

    #: Names of the groups of `group_losses` (read by `gflow.plot.group_losses`).
    group_names = GROUP_NAMES
    #: The scores of Yang et al.'s Fig. 1a (read by `gflow.plot.attention_scores`):
    #: in Phase 2 the first two rise and the last two fall.
    attention_pairs = ATTENTION_PAIRS

    @staticmethod
    def groups(data):
        """The group (0..3 for I1..I4) of every sample."""
        return data["group"]

    def group_losses(self, params, data):
        """Mean loss of each group I1..I4, shape `(4,)` (NaN for an empty group)."""
        losses = self.per_example_loss(params, data)
        onehot = jax.nn.one_hot(data["group"], 4, dtype=losses.dtype)
        return (onehot.T @ losses) / jnp.sum(onehot, axis=0)

    def mlp_value(self, params, word):
        """G(µ) = Σ_j a_j w_jᵀ W_V µ for a word id (or an array of ids)."""
        values = self._a(params["W"].dtype) @ params["W"] @ params["W_V"]
        return values[word]

    @staticmethod
    def attention_score(params, i, j):
        """µ_iᵀ W_Kᵀ W_Q µ_j: how much query word j attends to key word i."""
        return params["W_K"][:, i] @ params["W_Q"][:, j]

    @staticmethod
    def value_overlap(params, i, j):
        """µ_iᵀ W_Vᵀ W_V µ_j."""
        return params["W_V"][:, i] @ params["W_V"][:, j]

    def is_aligned(self, params, data):
        """Phase 1's goal: every sample classified correctly (y_i F_i > 0) and the
        MLP's signs right, G(µ1) > 0, G(µ2) > 0, G(µ3) < 0."""
        g = self.mlp_value(params, jnp.array([TARGET_1, TARGET_2, COMMON]))
        margins_ok = jnp.all(self.margins(params, data) > 0)
        return margins_ok & (g[0] > 0) & (g[1] > 0) & (g[2] < 0)

    @property
    def phase_spec(self) -> PhaseSpec:
        """What `gflow.detect_phases` watches: the alignment test `is_aligned`, and
        the drift of the attention pattern's parameters W_Q, W_K and W_KᵀW_Q.

        W_V is counted with the MLP: the value path G(µ) = aᵀ W W_V µ is what aligns
        in Phase 1. Measured at the paper's scale, at the end of Phase 1 W_V has
        moved by 7.7% (W by 1.3%) while W_Q, W_K have moved by 1e-4 and W_KᵀW_Q by
        3e-4.
        """
        return PhaseSpec(
            attention=("W_Q", "W_K"),
            mlp=("W", "W_V"),
            products=(("W_K", "W_Q"),),
            alignment=self.is_aligned,
        )

    @staticmethod
    def key_query(params):
        """The d × d matrix W_Kᵀ W_Q of all attention scores."""
        return params["W_K"].T @ params["W_Q"]
