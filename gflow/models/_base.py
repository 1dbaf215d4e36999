"""What every built-in model offers, and seeding NumPy from JAX keys."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import is_int


class AbstractModel(eqx.Module):
    """A model: static configuration, `init(key) -> params` and `loss(params, data)`.

    Parameters are plain pytrees (dicts of arrays) made by `init`; the model object
    itself holds only settings, so it can be hashed, compared and reused across
    calls of `gflow.simulate` without recompiling.
    """

    @abc.abstractmethod
    def init(self, key: jax.Array) -> Any:
        """Initial parameters drawn with `key`."""

    @abc.abstractmethod
    def loss(self, params: Any, data: Any) -> jax.Array:
        """The scalar training loss."""


class AbstractExampleModel(AbstractModel):
    """A model whose loss is the mean of a loss per example."""

    @abc.abstractmethod
    def per_example_loss(self, params: Any, data: Any) -> jax.Array:
        """The loss of each example, shape `(n,)`."""

    def loss(self, params: Any, data: Any) -> jax.Array:
        """The mean of `per_example_loss` over the examples."""
        return jnp.mean(self.per_example_loss(params, data))


def numpy_rng(key) -> np.random.Generator:
    """A NumPy generator seeded from a JAX PRNG key or an int seed.

    Data generators with irregular structure (per-sample placements) are written in
    NumPy; this keeps them reproducible from the same keys as the rest of JAX code.
    """
    if is_int(key):
        return np.random.default_rng(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key).ravel())
