"""The simplest models with known gradient flows: linear regression and deep linear
networks (Saxe, McClelland & Ganguli 2014)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import require, require_int, require_positive
from ._base import AbstractExampleModel


class LinearRegression(AbstractExampleModel):
    """Least squares `½ mean_i (w·x_i + b − y_i)²`.

    Its gradient flow is linear: θ(t) = θ* + expm(−tH)(θ0 − θ*) with H the Hessian
    of the loss, so it is the plainest closed-form check of a solver.

    Attributes:
        n_features: the number of input features (keyword only).

    Data: `{"x": (n, n_features), "y": (n,)}`. Parameters: `{"w": (n_features,),
    "b": ()}`, initialised to zero.

    Examples:
        >>> model = gflow.models.LinearRegression(n_features=3)
        >>> traj = gflow.simulate(model, {"x": x, "y": y}, 10.0, key=0)
    """

    n_features: int = eqx.field(kw_only=True)

    def __check_init__(self):
        require_int("n_features", self.n_features, 1)

    def init(self, key):
        del key  # the flow from zero is the canonical one; pass params0 for others
        return {"w": jnp.zeros(self.n_features), "b": jnp.zeros(())}

    def per_example_loss(self, params, data):
        residual = data["x"] @ params["w"] + params["b"] - data["y"]
        return 0.5 * residual**2


class DeepLinearNetwork(AbstractExampleModel):
    """A deep linear network `W_L ⋯ W_1 x` with squared loss.

    `½ mean_i |W_L ⋯ W_1 x_i − y_i|²`. Its gradient flow conserves the imbalance
    `W_{l+1}ᵀ W_{l+1} − W_l W_lᵀ` of every pair of neighbouring layers exactly, and
    from a small initialisation it learns the singular modes of the input–output
    correlation one at a time, strongest first (Saxe et al. 2014).

    Attributes:
        dims: layer widths `(d_in, h_1, ..., d_out)`, at least two entries.
        init_scale: standard deviation of the Gaussian initial entries (small
            values give the stage-like "saddle to saddle" dynamics).

    Data: `{"x": (n, d_in), "y": (n, d_out)}`. Parameters: `{"W": [W_1, ..., W_L]}`
    with `W_l` of shape `(dims[l], dims[l-1])`.

    Examples:
        >>> model = gflow.models.DeepLinearNetwork((4, 16, 4), init_scale=1e-3)
        >>> traj = gflow.simulate(model, data, 30.0, key=0)
    """

    dims: tuple[int, ...]
    init_scale: float = eqx.field(default=1e-2, kw_only=True)

    def __check_init__(self):
        require(
            isinstance(self.dims, tuple) and len(self.dims) >= 2,
            f"`dims` must be a tuple of at least two layer widths; got {self.dims!r}.",
        )
        for i, width in enumerate(self.dims):
            require_int(f"dims[{i}]", width, 1)
        require_positive("init_scale", self.init_scale)

    def init(self, key):
        keys = jax.random.split(key, len(self.dims) - 1)
        return {
            "W": [
                self.init_scale * jax.random.normal(k, (n_out, n_in))
                for k, n_in, n_out in zip(
                    keys, self.dims[:-1], self.dims[1:], strict=True
                )
            ]
        }

    @staticmethod
    def product(params):
        """The end-to-end matrix `W_L ⋯ W_1`."""
        out = params["W"][0]
        for w in params["W"][1:]:
            out = w @ out
        return out

    def per_example_loss(self, params, data):
        residual = data["x"] @ self.product(params).T - data["y"]
        return 0.5 * jnp.sum(residual**2, axis=-1)

    @staticmethod
    def imbalances(params):
        """`W_{l+1}ᵀ W_{l+1} − W_l W_lᵀ` for each pair of layers (conserved)."""
        ws = params["W"]
        return [ws[i + 1].T @ ws[i + 1] - ws[i] @ ws[i].T for i in range(len(ws) - 1)]
