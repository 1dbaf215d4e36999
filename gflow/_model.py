"""Turn what the user passed as a model into a loss function and initial parameters.

A model is either an object with `loss(params, data)` (and `init(key)` when no
`params0` is given), or a plain function `loss(params, data)` together with
`params0`. Parameters are plain pytrees of floating-point arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LossFn = Callable[[Any, Any], jax.Array]


def resolve_loss(model: Any) -> LossFn:
    """The loss function of `model`: its `loss` method, or `model` itself."""
    loss = getattr(model, "loss", None)
    if loss is not None and callable(loss):
        return loss
    if callable(model):
        return model
    raise TypeError(
        f"`model` must be an object with a `loss(params, data)` method or a plain "
        f"function `loss(params, data)`; got {type(model).__name__}."
    )


def as_key(key: Any) -> tuple[jax.Array, int | None]:
    """A PRNG key from an int seed or a key; also the seed, for the metadata."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key)), int(key)
    if isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        return key, None
    raise TypeError(
        "`key` must be an int seed or a JAX PRNG key (jax.random.key(seed)); "
        f"got {type(key).__name__}."
    )


def initial_params(model: Any, params0: Any, key: Any) -> tuple[Any, int | None]:
    """`params0` checked and converted to arrays, or `model.init(key)`.

    Returns the parameters and the integer seed they came from (None if unknown).
    """
    seed = None
    if params0 is None:
        init = getattr(model, "init", None)
        if init is None or not callable(init):
            raise ValueError(
                "`params0` is required when `model` is a plain loss function (or has "
                "no `init(key)` method): pass the initial parameters as `params0=`."
            )
        if key is None:
            raise ValueError(
                "`model.init` needs a random key: pass `key=` (an int seed or "
                "jax.random.key(seed)), or pass the initial parameters as `params0=`."
            )
        key, seed = as_key(key)
        params0 = init(key)
    return check_params(params0, "params0"), seed


def check_params(params: Any, name: str) -> Any:
    """Every leaf as a floating-point JAX array, or a TypeError naming the leaf."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not leaves_with_path:
        raise ValueError(f"`{name}` has no array leaves: there is nothing to train.")
    leaves = []
    for path, leaf in leaves_with_path:
        where = jax.tree_util.keystr(path) or "(the root)"
        if not isinstance(leaf, jax.Array | np.ndarray | float | np.floating) or (
            isinstance(leaf, np.ndarray) and not np.issubdtype(leaf.dtype, np.number)
        ):
            raise TypeError(
                f"`{name}` leaf {where} is a {type(leaf).__name__}; every leaf must "
                "be a floating-point array. Keep fixed settings in the model or the "
                "data instead."
            )
        array = jnp.asarray(leaf)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(
                f"`{name}` leaf {where} has dtype {array.dtype}; gradient flow needs "
                "floating-point parameters. Convert it, e.g. with .astype(float)."
            )
        leaves.append(array)
    return jax.tree_util.tree_unflatten(treedef, leaves)
