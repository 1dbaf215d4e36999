"""Turn what the user passed as a model into a loss function and initial parameters.

A model is either an object with `loss(params, data)` (and `init(key)` when no
`params0` is given), or a plain function `loss(params, data)` together with
`params0`. Parameters are any pytree (an equinox Module included): its
floating-point array leaves are trained, the rest held fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
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


def raw_keys(name: str, keys: Any, members: int | None) -> jax.Array:
    """PRNG keys as raw uint32 data with a leading member axis, checked: one key
    (an int seed, `jax.random.key(seed)` or raw uint32 data) when `members` is
    None, else a batch of `members` keys. Errors name the argument `name`."""
    want = (
        "one key (an int seed or jax.random.key(seed))"
        if members is None
        else f"{members} keys, one per member (jax.random.split(key, {members}))"
    )
    if isinstance(keys, int | np.integer) and not isinstance(keys, bool):
        keys = jax.random.key(int(keys))
    try:
        keys = jnp.asarray(keys)
    except TypeError as e:
        raise TypeError(f"`{name}` must be {want}; got {keys!r}.") from e
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    shape = () if members is None else (members,)
    if keys.dtype != jnp.uint32 or keys.shape != shape + (2,):
        raise ValueError(
            f"`{name}` must be {want}; got shape {tuple(keys.shape)} and dtype "
            f"{keys.dtype}."
        )
    return keys if members is not None else keys[None]


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
    """`params` with Python floats as arrays, checked to have something to train:
    at least one floating-point array leaf. Every other leaf (functions, ints,
    strings, integer arrays, static fields of an equinox Module) is held fixed."""
    params = jax.tree.map(
        lambda x: jnp.asarray(x) if isinstance(x, float | np.floating) else x, params
    )
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves: there is nothing to train.")
    if not any(eqx.is_inexact_array(leaf) for _, leaf in leaves):
        fixed = ", ".join(
            f"leaf {jax.tree_util.keystr(path) or '(the root)'} "
            f"({getattr(leaf, 'dtype', type(leaf).__name__)})"
            for path, leaf in leaves[:5]
        )
        raise TypeError(
            f"`{name}` has no floating-point array leaf: there is nothing to train "
            f"(every leaf would be held fixed: {fixed}). Gradient flow needs "
            "floating-point parameters; convert them, e.g. with .astype(float)."
        )
    return params


def split(params: Any) -> tuple[Any, Any]:
    """(trained, fixed): the floating-point array leaves, and the rest, as
    `eqx.partition` splits them (`None` where the other part has the leaf)."""
    return eqx.partition(params, eqx.is_inexact_array)


class Bound(eqx.Module):
    """`fn(params, data)` called on the trained leaves alone: the fixed leaves are
    put back first. A Module, so that the same model and function reuse the
    compiled program (its fixed arrays are arguments, its functions static)."""

    fn: Callable
    fixed: Any

    def __call__(self, trained: Any, data: Any) -> Any:
        return self.fn(eqx.combine(trained, self.fixed), data)


def bind(fn: Callable | None, fixed: Any) -> Callable | None:
    """`fn` on the trained leaves (`Bound`), or `fn` itself when nothing is fixed."""
    if fn is None or not jax.tree.leaves(fixed):
        return fn
    return Bound(fn, fixed)
