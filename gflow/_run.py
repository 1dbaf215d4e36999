"""What every run that produces a Trajectory shares: input checks, the evaluation
of saved states, and the host-side assembly that drops invalid rows."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._compile import CompileTimer
from ._model import LossFn
from ._trajectory import Trajectory
from ._tree import tree_norm

# Saved states are evaluated (loss, gradient, metrics) this many at a time: vmapped
# within a chunk, scanned across chunks, so memory stays bounded for long saves.
_SAVE_CHUNK = 32
_MATMUL_PRECISIONS = (None, "highest", "high", "default", "float32", "tensorfloat32")


def gflow_version() -> str:
    try:
        return version("gflow")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


def positive_finite(x: Any) -> bool:
    """Whether `x` is a positive finite real number (False for anything else)."""
    try:
        return math.isfinite(float(x)) and float(x) > 0
    except (TypeError, ValueError):
        return False


def matmul_precision_context(matmul_precision: str | None):
    """`jax.default_matmul_precision(...)`, or no change for None; checked."""
    if matmul_precision not in _MATMUL_PRECISIONS:
        raise ValueError(
            f"`matmul_precision` must be one of {_MATMUL_PRECISIONS}; "
            f"got {matmul_precision!r}."
        )
    if matmul_precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(matmul_precision)


def check_metrics(metrics: Any) -> tuple[tuple[str, Callable], ...]:
    """`{name: fn(params, data)}` as a hashable tuple of pairs, or a TypeError."""
    metrics = {} if metrics is None else metrics
    if not isinstance(metrics, Mapping) or not all(
        isinstance(k, str) and callable(f) for k, f in metrics.items()
    ):
        raise TypeError(
            "`metrics` must be a dict {name: fn(params, data)} with string names and "
            "callable values."
        )
    return tuple(metrics.items())


def checked_loss(loss_fn: LossFn, params: Any, data: Any) -> jax.ShapeDtypeStruct:
    """Trace the loss once abstractly, turning shape errors into clear ones.

    This runs while JAX traces the solve (`jax.eval_shape` adds nothing to the
    compiled program), so it costs nothing when the compiled program is reused.
    """
    try:
        value = jax.eval_shape(loss_fn, params, data)
    except Exception as e:  # noqa: BLE001 - re-raised with context below
        raise ValueError(
            f"loss(params, data) failed on the given parameters and data: "
            f"{type(e).__name__}: {e}\nCheck that `data` has the shapes the loss "
            "expects and that `params0` (or model.init) matches the model."
        ) from e
    if not isinstance(value, jax.ShapeDtypeStruct) or value.shape != ():
        shape = getattr(value, "shape", type(value).__name__)
        raise ValueError(
            f"loss(params, data) must return a scalar; it returned {shape}. "
            "Reduce it, e.g. with jnp.mean over the examples."
        )
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
            f"loss(params, data) must be floating-point; got {value.dtype}."
        )
    return value


def evaluate_saves(loss_fn: LossFn, metrics: tuple, ys: Any, data: Any) -> dict:
    """`loss`, `velocity` -∇L, `grad_norm` and `metrics` of every saved state
    (leading axis of `ys`)."""

    def one(y):
        loss, grad = jax.value_and_grad(loss_fn)(y, data)
        values = {name: fn(y, data) for name, fn in metrics}
        return dict(
            loss=loss,
            velocity=jax.tree.map(jnp.negative, grad),
            grad_norm=tree_norm(grad),
            metrics=values,
        )

    return jax.lax.map(one, ys, batch_size=_SAVE_CHUNK)


def make_trajectory(
    out: dict, rows: list[int], result: str, stats: dict, timer: CompileTimer, meta
) -> Trajectory:
    """The Trajectory of the given rows of a run's output.

    Rows from the first non-finite loss or parameter on are dropped and the result
    becomes "diverged": a trajectory never presents inf/NaN states as data.
    """
    loss = np.asarray(out["loss"])[rows]
    finite = np.isfinite(loss) & np.all(
        [
            np.all(np.isfinite(np.asarray(leaf)[rows]).reshape(len(rows), -1), axis=1)
            for leaf in jax.tree.leaves(out["params"])
        ],
        axis=0,
    )
    if not finite.all():
        result = "diverged"
        rows = rows[: int(np.argmin(finite))]
    index = np.asarray(rows, dtype=np.int64)

    def take(x):
        return x[index]

    stats = dict(
        stats,
        wall_time_s=timer.wall_time_s,
        compile_time_s=timer.compile_time_s,
        run_time_s=timer.run_time_s,
        compiled=timer.num_compilations > 0,
    )
    return Trajectory(
        ts=take(out["ts"]),
        params=jax.tree.map(take, out["params"]),
        velocity=jax.tree.map(take, out["velocity"]),
        loss=take(out["loss"]),
        grad_norm=take(out["grad_norm"]),
        metrics=jax.tree.map(take, out["metrics"]),
        result=result,
        stats=stats,
        meta=meta,
    )
