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

from ._checks import check_keys, check_params, is_int
from .metrics import AbstractCarriedMetric

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
        seed = int(key) if is_int(key) else None
        params0 = init(check_keys("key", key, None))
    return check_params(params0, "params0"), seed


def initial_batch(model: Any, params0: Any, keys: Any) -> Any:
    """The batched initial parameters, checked."""
    init = getattr(model, "init", None)
    if (params0 is None) == (keys is None):
        raise ValueError(
            ("`params0` is required" if params0 is None else "got both")
            + ": pass exactly one of `params0` (initial parameters with a leading "
            "batch axis) and `keys` (a batch of PRNG keys for model.init, for a model "
            "that has one)."
        )
    if keys is not None:
        if not callable(init):
            raise ValueError(
                "`keys` needs a model with an `init(key)` method; for a plain loss "
                "function pass the batched initial parameters as `params0=`."
            )
        keys = check_keys("keys", keys, True)
        return check_params(eqx.filter_vmap(init)(keys), "params0")
    params0 = check_params(params0, "params0")
    sizes = {
        jax.tree_util.keystr(path) or "(the root)": (
            leaf.shape[0] if leaf.ndim else None
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(params0)
        if eqx.is_inexact_array(leaf)
    }
    if None in sizes.values():
        where = next(k for k, v in sizes.items() if v is None)
        raise ValueError(
            f"`params0` leaf {where} is a scalar: every leaf needs a leading batch "
            "axis (one entry per member)."
        )
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "`params0` leaves disagree on the batch size (the leading axis): "
            + ", ".join(f"{k}: {v}" for k, v in sizes.items())
        )
    if next(iter(sizes.values())) == 0:
        raise ValueError("`params0` is an empty batch: it has no members.")
    return params0


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


class BoundCarried(AbstractCarriedMetric):
    """A carried metric (`gflow.metrics.AbstractCarriedMetric`) on the trained
    leaves alone, as `Bound` is for a function."""

    metric: AbstractCarriedMetric
    fixed: Any

    def init(self, trained: Any, data: Any) -> Any:
        return self.metric.init(eqx.combine(trained, self.fixed), data)

    def __call__(self, trained: Any, data: Any, carried: Any) -> tuple[Any, Any]:
        return self.metric(eqx.combine(trained, self.fixed), data, carried)


def bind(fn: Callable | None, fixed: Any) -> Callable | None:
    """`fn` on the trained leaves (`Bound`, `BoundCarried`), or `fn` itself when
    nothing is fixed."""
    if fn is None or not jax.tree.leaves(fixed):
        return fn
    if isinstance(fn, AbstractCarriedMetric):
        return BoundCarried(fn, fixed)
    return Bound(fn, fixed)
