"""Validators of user input: every check that names an argument lives here.

A leaf module (it imports nothing of gflow), so that the entry points, the options,
the flows and the models all reuse the same checks and say the same things.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def positive_finite(x: Any) -> bool:
    """Whether `x` is a positive finite real number (False for anything else)."""
    if isinstance(x, bool | str):
        return False
    try:
        return math.isfinite(float(x)) and float(x) > 0
    except (TypeError, ValueError):
        return False


def require(condition: bool, message: str) -> None:
    """A ValueError with `message` unless `condition` holds."""
    if not condition:
        raise ValueError(message)


def require_finite(name: str, tree: Any) -> None:
    """A ValueError naming `name` and its first leaf with inf/NaN values."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        values = np.asarray(leaf) if eqx.is_array(leaf) else None
        if values is None or not np.issubdtype(values.dtype, np.inexact):
            continue
        bad = ~np.isfinite(values)
        if bad.any():
            where = jax.tree_util.keystr(path) or "(the root)"
            raise ValueError(
                f"`{name}` holds inf/NaN values: leaf {where} has {int(bad.sum())} of "
                f"{values.size}. The flow of a loss on them is undefined: remove or "
                "replace them before calling gflow."
            )


def require_positive(name: str, value: Any) -> None:
    """A ValueError naming `name` unless `value` is a positive finite number."""
    require(
        positive_finite(value),
        f"`{name}` must be a positive finite number; got {value!r}.",
    )


def require_probability(name: str, value: Any) -> None:
    """A ValueError naming `name` unless `0 < value < 1`."""
    require(
        isinstance(value, int | float) and 0 < value < 1,
        f"`{name}` must be a probability strictly between 0 and 1; got {value!r}.",
    )


def is_int(x: Any) -> bool:
    """Whether `x` is an integer (a bool is not)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def require_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int of at least `minimum`, or a ValueError naming `name` (a
    size of a model or a grid)."""
    require(
        is_int(value) and value >= minimum,
        f"`{name}` must be an integer >= {minimum}; got {value!r}.",
    )
    return int(value)


def require_ints(**sizes: tuple[Any, int]) -> None:
    """`require_int` for each `name=(value, minimum)`."""
    for name, (value, minimum) in sizes.items():
        require_int(name, value, minimum)


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int of at least `minimum` (a count of an entry point's
    options): a TypeError for a non-integer, a ValueError below `minimum`."""
    if not is_int(value):
        raise TypeError(f"`{name}` must be an int; got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}; got {value}.")
    return int(value)


def check_functions(name: str, value: Any) -> tuple[tuple[str, Any], ...]:
    """A dict `{name: fn(params, data)}` (None: empty) as a tuple of pairs, which
    is hashable (part of a compiled program's identity); a TypeError unless its
    names are strings and its values callable."""
    value = {} if value is None else value
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and callable(f) for k, f in value.items()
    ):
        raise TypeError(
            f"`{name}` must be a dict {{name: fn(params, data)}} with string names "
            "and callable values."
        )
    return tuple(value.items())


def check_batch_size(batch_size: Any, examples: int | None = None) -> int:
    """`batch_size` as an int of at least 1 and at most `examples` (when known)."""
    require(
        is_int(batch_size) and batch_size >= 1,
        f"`batch_size` must be an integer >= 1; got {batch_size!r}.",
    )
    require(
        examples is None or batch_size <= examples,
        f"`batch_size` = {batch_size} is larger than the data's {examples} examples.",
    )
    return int(batch_size)


def check_t_max(t_max: Any) -> float:
    """`t_max` as a positive finite float: a TypeError for anything that is not a
    real number (strings included), a ValueError for one that is not positive."""
    try:
        if isinstance(t_max, str | bytes | bool):
            raise TypeError
        value = float(t_max)
    except (TypeError, ValueError):
        raise TypeError(
            f"`t_max` must be a positive real number; got {type(t_max).__name__}."
        ) from None
    require(
        math.isfinite(value) and value > 0,
        f"`t_max` must be positive and finite; got {t_max!r}.",
    )
    return value


def check_ts(ts: Any, t_max: float, short: bool = False) -> np.ndarray:
    """User-given save times, checked against `t_max`; float64. `short`: times
    that end before `t_max` are allowed, and `t_max` is appended."""
    array = np.asarray(ts)
    require(
        array.ndim == 1, f"`ts` must be a 1-D array of times; got shape {array.shape}."
    )
    require(array.size >= 2, "`ts` needs at least two times: 0 and t_max.")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"`ts` must hold real numbers; got dtype {array.dtype}.")
    array = array.astype(np.float64)
    require(bool(np.all(np.isfinite(array))), "`ts` must be finite.")
    require(
        array[0] == 0,
        f"`ts` must start at 0 (the initial parameters); got ts[0] = {array[0]}.",
    )
    if np.any(np.diff(array) <= 0):
        i = int(np.argmax(np.diff(array) <= 0))
        raise ValueError(
            "`ts` must be strictly increasing; "
            f"ts[{i}] = {array[i]} is followed by ts[{i + 1}] = {array[i + 1]}."
        )
    if math.isclose(array[-1], t_max, rel_tol=1e-12):
        array[-1] = t_max
        return array
    require(
        short and array[-1] < t_max,
        f"`ts` must end at t_max = {t_max}; got ts[-1] = {array[-1]}. Pass "
        "t_max=ts[-1], or append t_max to ts.",
    )
    return np.append(array, t_max)


def check_keys(name: str, keys: Any, members: int | None | bool) -> jax.Array:
    """PRNG keys, checked, as a typed key array.

    `members` None: one key (an int seed, `jax.random.key(seed)` or raw uint32
    data), shape `()`. An int: a batch of exactly that many keys, shape
    `(members,)`. True: a batch of any (nonzero) size. Raw uint32 keys have a
    trailing axis of 2. Errors name the argument `name`.
    """
    if members is None:
        want = "an int seed or a JAX PRNG key (jax.random.key(seed))"
    elif members is True:
        want = (
            "a batch of PRNG keys: shape (B,) from jax.random.split(key, B), or raw "
            "uint32 keys of shape (B, 2)"
        )
    else:
        want = f"{members} keys, one per member (jax.random.split(key, {members}))"
    if members is None and is_int(keys):
        return jax.random.key(int(keys))
    if not isinstance(keys, jax.Array | np.ndarray):
        raise TypeError(f"`{name}` must be {want}; got {type(keys).__name__}.")
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        if keys.dtype != np.uint32 or keys.shape[-1:] != (2,):
            raise ValueError(
                f"`{name}` must be {want}; got shape {tuple(keys.shape)} and dtype "
                f"{keys.dtype}."
            )
        keys = jax.random.wrap_key_data(jnp.asarray(keys))
    batch = keys.shape[:1] if keys.ndim == 1 else None
    ok = (
        keys.ndim == 0
        if members is None
        else keys.ndim == 1 and (members is True or batch == (members,))
    )
    if not ok:
        raise ValueError(
            f"`{name}` must be {want}; got a key array of shape {tuple(keys.shape)}."
        )
    if members is True and keys.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch: it has no members.")
    return keys


def check_params(params: Any, name: str) -> Any:
    """`params` with Python floats as arrays, checked to have something to train:
    at least one floating-point array leaf. Every other leaf (functions, ints,
    strings, integer arrays, static fields of an equinox Module) is held fixed."""
    warn_float64(name, params)
    params = jax.tree.map(
        lambda x: jnp.asarray(x) if isinstance(x, float | np.floating) else x, params
    )
    leaves = jax.tree_util.tree_leaves_with_path(params)
    require(bool(leaves), f"`{name}` has no array leaves: there is nothing to train.")
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


def warn_float64(name: str, tree: Any) -> None:
    """Warn once if `tree` (parameters or data) holds float64 NumPy values while
    JAX's float64 mode is off: JAX computes them in float32."""
    if not jax.config.jax_enable_x64 and any(
        isinstance(x, np.ndarray | np.floating) and x.dtype == np.float64
        for x in jax.tree.leaves(tree)
    ):
        _warn_once(
            f"`{name}` holds float64 NumPy values, which JAX computes in float32: "
            "its float64 mode is off. To run in float64, call "
            "jax.config.update('jax_enable_x64', True) first.",
        )


def check_one_dtype(params: Any) -> None:
    """A ValueError naming the leaves if the trained parameters mix floating
    dtypes (float32 and float64): a flow's state and its steps take one."""
    dtypes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtypes.setdefault(str(jnp.result_type(leaf)), jax.tree_util.keystr(path))
    if len(dtypes) > 1:
        leaves = ", ".join(f"{path or 'params'} is {d}" for d, path in dtypes.items())
        raise ValueError(
            f"the trained parameters mix floating dtypes ({leaves}); cast them to "
            "one, e.g. jax.tree.map(lambda x: x.astype(jnp.float32), params0) (a "
            "float32 array times a NumPy float64 number is float64 under "
            "jax_enable_x64)."
        )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A UserWarning, the first time in a process only."""
    if message not in _WARNED:
        _WARNED.add(message)
        warn(message)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str) -> None:
    """A UserWarning attributed to the user's line that called gflow: the caller
    of the outermost gflow frame, however deep in gflow (and in the libraries it
    calls, such as equinox's method wrappers) the warning is raised. Entry points
    reach the same check at different depths, so no fixed `stacklevel` fits."""
    frame, level, outermost = sys._getframe(1), 2, 2  # level 2: warn's caller
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE):
            outermost = level
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=outermost + 1)
