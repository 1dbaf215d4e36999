"""Discrete optimisers on the gradient flow's time axis, and trajectory comparison."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checkpoint, _engine, _run
from ._compile import CompileTimer
from ._model import initial_params, raw_keys, resolve_loss
from ._options import (
    CHECKPOINT_KEYWORDS,
    COMMON_KEYWORDS,
    check_batch_size,
    matmul_precision_context,
    parse,
    require_positive,
    takes_options,
)
from ._outcome import raise_if_failed, result_code
from ._trajectory import Trajectory
from .flows import GradientFlow


@takes_options(*COMMON_KEYWORDS, *CHECKPOINT_KEYWORDS)
def gradient_descent(
    model: Any,
    data: Any,
    t_max: float,
    lr: float,
    *,
    params0: Any = None,
    key: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    time_per_step: float | None = None,
    batch_size: int | None = None,
    batch_key: Any = None,
    **options: Any,
) -> Trajectory:
    """Gradient descent (or any optax optimiser) on the gradient flow's time axis.

    Step k sits at flow time `t = k * time_per_step`, by default `k * lr`: plain
    gradient descent with learning rate `lr` is the Euler discretisation of the flow
    with step `lr`. All steps run in one compiled program (`lax.scan` over the save
    intervals); `data` and `lr` are arguments of it, so new data, initial parameters
    or learning rates of the same shapes do not recompile.

    Time conventions for other optimisers (pass them as `time_per_step`):
    heavy-ball momentum μ with learning rate α moves about α / (1 − μ) of flow time
    per step once its velocity has built up (`gflow.flows.HeavyBall` is its
    continuous model on that axis); Adam and other adaptive methods have no
    flow-time mapping, and `k * lr` is then only a convention. Continuous models
    of gradient descent at finite `lr` and of minibatch SGD are
    `gflow.flows.ModifiedGD` and `gflow.flows.SGD`.

    Args:
        model: as in [`gflow.simulate`][].
        data: as in `gflow.simulate`.
        t_max: the final time; the run takes `round(t_max / time_per_step)` steps.
        lr: the learning rate of plain gradient descent (and the default time per
            step). Ignored for the update when `optimizer` is given.
        params0: as in `gflow.simulate`.
        key: as in `gflow.simulate`.
        optimizer: an optax `GradientTransformation` to use instead of plain
            gradient descent. Reuse the same object across calls to avoid
            recompiling.
        time_per_step: flow time per step (default `lr`).
        batch_size: minibatch SGD: each step's gradient is the loss gradient on
            `batch_size` examples drawn at random without replacement (a fresh
            draw each step). The examples are the leading axis of every leaf of
            `data` (all leaves must share it). Default: full-batch gradients. The
            saved rows (loss, gradient norm, metrics) are always on all the data.
            `gflow.flows.SGD` is its continuous model.
        batch_key: the key of the minibatch draws (an int seed or
            `jax.random.key(seed)`); required with `batch_size`.

    {keyword_args}

    Save times (`ts`, or the grid of `n_save` and `spacing`) are rounded to the
    nearest whole step (duplicates dropped), so `traj.ts` are exact multiples of
    `time_per_step`.

    Returns:
        A [`gflow.Trajectory`][] with `stats["num_steps"]` steps and
        `stats["num_grad_evals"]` = steps + saved states. If the iterates become
        inf/NaN (a learning rate above 2 / sharpness), `result` is `"diverged"`
        and the trajectory ends at the last finite save.

    Example:
        >>> gd = gflow.gradient_descent(model, data, 300.0, lr=0.01, key=0)
        >>> flow = gflow.simulate(model, data, 300.0, key=0, ts=gd.ts)
        >>> gflow.compare(flow, gd).max_param_distance
    """
    loss_fn = resolve_loss(model)
    opts = parse("gradient_descent", t_max, gradient_descent.__gflow_keywords__,
                 options)  # fmt: skip
    require_positive("lr", lr)
    tau = float(lr) if time_per_step is None else time_per_step
    require_positive("time_per_step", tau)
    n_steps = round(opts.saves.t_max / tau)
    if n_steps < 1:
        raise ValueError(
            f"t_max = {opts.saves.t_max} is less than one step of {tau}: raise t_max "
            "or lower lr."
        )
    if optimizer is not None and not isinstance(
        optimizer, optax.GradientTransformation
    ):
        raise TypeError(
            "`optimizer` must be an optax.GradientTransformation (e.g. optax.sgd(0.1, "
            f"momentum=0.9)); got {type(optimizer).__name__}."
        )
    steps = np.minimum(np.rint(opts.saves.ts / tau).astype(np.int64), n_steps)
    steps[-1] = n_steps  # the last save is the last step, even if t_max rounds
    # Of saves rounding to the same step, the last is kept (the final one included).
    keep = np.append(np.diff(steps) > 0, True)
    steps = steps[keep]
    opts = eqx.tree_at(
        lambda o: (o.saves.ts, o.saves.params_at),
        opts,
        (steps * tau, opts.saves.params_at[keep]),
    )
    batches = _batches(batch_size, batch_key, data)
    params0, seed = initial_params(model, params0, key)
    params0, fixed, loss_fn, opts = _run.trained_part(loss_fn, opts, params0)
    dtype = jnp.result_type(*jax.tree.leaves(params0))
    _run.checked_loss(loss_fn, params0, data)
    _run.checked_metrics(opts, params0, data)
    slot = np.where(opts.saves.params_at, np.cumsum(opts.saves.params_at) - 1,
                    opts.saves.params_at.sum())  # fmt: skip

    n_slots = int(opts.saves.params_at.sum())
    save_steps = jnp.asarray(steps, jnp.int32)
    slot = jnp.asarray(slot, jnp.int32)
    lr_array = jnp.asarray(lr, dtype=dtype)
    meta = opts.meta("discrete", dtype)
    meta.update(
        solver="gradient_descent" if optimizer is None else "optax",
        lr=float(lr),
        time_per_step=tau,
        seed=seed,
        t_max=n_steps * tau,
        batch_size=batch_size,
    )

    def fresh():
        return _start(loss_fn, params0, data, slot, optimizer, opts.metrics, n_slots,
                      len(steps))  # fmt: skip

    def advance(state, budget):
        budget = jnp.asarray(budget, jnp.int32)
        return _descend(loss_fn, state, data, save_steps, slot, lr_array, optimizer,
                        opts.metrics, budget, batches)  # fmt: skip

    saving = opts.checkpointing
    with matmul_precision_context(opts.matmul_precision):
        if saving.folder is None:
            with CompileTimer() as timer:
                state = jax.block_until_ready(advance(fresh(), n_steps))
            stats = {}
        else:
            call = _checkpoint.describe(model, opts, meta, optimizer=repr(optimizer))
            stamp = _checkpoint.fingerprint(
                "gradient_descent", call, params0, eqx.filter(fixed, eqx.is_array),
                data, save_steps, batches,
            )  # fmt: skip
            state, timer, stats = _checkpoint.run_in_segments(
                fresh, advance, lambda s: int(s.steps) >= n_steps,
                lambda s: int(s.steps), saving.folder, stamp, saving.every_s,
                saving.every_steps,
            )  # fmt: skip
    out = _outputs(state, jnp.asarray(steps * tau, dtype))
    traj = _run.trajectory(out, opts, meta, timer, batched=False, fixed=fixed,
                           stats=stats)  # fmt: skip
    return raise_if_failed(traj, "gradient_descent", "discrete") if opts.throw else traj


class _Batches(eqx.Module):
    """Minibatches: `size` examples drawn without replacement, with the key
    `fold_in(key, step)` at each step."""

    key: jax.Array  # raw uint32
    size: int = eqx.field(static=True)

    def draw(self, data, step):
        key = jax.random.fold_in(jax.random.wrap_key_data(self.key), step)
        n = jax.tree.leaves(data)[0].shape[0]
        picked = jax.random.choice(key, n, (self.size,), replace=False)
        return jax.tree.map(lambda x: x[picked], data)


def _batches(batch_size, batch_key, data) -> _Batches | None:
    """The minibatches asked for, checked against the data; None for full batch."""
    if batch_size is None:
        if batch_key is not None:
            raise ValueError("`batch_key` is only used with `batch_size`.")
        return None
    check_batch_size(batch_size)
    if batch_key is None:
        raise ValueError(
            "`batch_size` needs `batch_key=` (an int seed or jax.random.key(seed)) "
            "for the minibatch draws."
        )
    key = raw_keys("batch_key", batch_key, None)[0]
    leaves = jax.tree.leaves(data)
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if not leaves or None in sizes or len(sizes) > 1:
        raise ValueError(
            "`batch_size` draws examples along the leading axis of every leaf of "
            "`data`, so every leaf must be an array with the same leading size; got "
            f"leading sizes {sorted(map(str, sizes)) or 'none (no array leaves)'}."
        )
    (n,) = sizes
    return _Batches(key, check_batch_size(batch_size, n))


class _Descent(eqx.Module):
    """Gradient descent part-way: the loop's carry, everything needed to go on."""

    params: Any
    opt_state: Any
    saved: Any  # (n_slots, ...): the parameters kept at the save rows
    velocity: Any
    loss: jax.Array  # (n_saves,): every save row
    grad_norm: jax.Array
    metrics: Any
    next_save: jax.Array  # the next save row to reach
    steps: jax.Array  # steps taken


def _row_fn(loss_fn, metrics, data):
    return lambda params: _engine.row_values(
        loss_fn, GradientFlow(), metrics, params, data
    )


@eqx.filter_jit
def _start(loss_fn, params0, data, slot, optimizer, metrics, n_slots: int,
           n_saves: int) -> _Descent:  # fmt: skip
    """The state before the first step: row 0 written."""
    first = _row_fn(loss_fn, metrics, data)(params0)

    def buffer(x, n, value):
        return jnp.zeros((n,) + jnp.shape(x), jnp.result_type(x)).at[0].set(value)

    kept = jax.tree.map(lambda x: jnp.zeros((n_slots,) + x.shape, x.dtype), params0)
    return _Descent(
        params=params0,
        opt_state=None if optimizer is None else optimizer.init(params0),
        saved=_put(kept, slot[0], params0),
        velocity=_put(kept, slot[0], first.velocity),
        loss=buffer(first.loss, n_saves, first.loss),
        grad_norm=buffer(first.grad_norm, n_saves, first.grad_norm),
        metrics=jax.tree.map(lambda x: buffer(x, n_saves, x), first.metrics),
        next_save=jnp.asarray(1, jnp.int32),
        steps=jnp.asarray(0, jnp.int32),
    )


def _put(buffer, at, values):
    return jax.tree.map(lambda b, v: b.at[at].set(v, mode="drop"), buffer, values)


@eqx.filter_jit
def _descend(loss_fn, state: _Descent, data, save_steps, slot, lr, optimizer,
             metrics, budget, batches: _Batches | None) -> _Descent:  # fmt: skip
    """Step from save row to save row until the last, or until `budget` steps have
    been taken (whole save intervals: at least one); on minibatches if `batches`."""
    grad_fn = jax.grad(loss_fn)
    row = _row_fn(loss_fn, metrics, data)
    stop_at = state.steps + jnp.minimum(budget, save_steps[-1] - state.steps)

    def step(k, carry):
        params, opt_state = carry
        grads = grad_fn(params, data if batches is None else batches.draw(data, k))
        if optimizer is None:
            return jax.tree.map(lambda p, g: p - lr * g, params, grads), opt_state
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def cond(state):
        return (state.next_save < save_steps.shape[0]) & (state.steps < stop_at)

    def interval(state):
        i = state.next_save
        params, opt_state = jax.lax.fori_loop(
            state.steps, save_steps[i], step, (state.params, state.opt_state)
        )
        values = row(params)
        return _Descent(
            params=params,
            opt_state=opt_state,
            saved=_put(state.saved, slot[i], params),
            velocity=_put(state.velocity, slot[i], values.velocity),
            loss=state.loss.at[i].set(values.loss),
            grad_norm=state.grad_norm.at[i].set(values.grad_norm),
            metrics=_put(state.metrics, i, values.metrics),
            next_save=i + 1,
            steps=save_steps[i],
        )

    return jax.lax.while_loop(cond, interval, state)


def _outputs(state: _Descent, ts) -> _engine.Outputs:
    """The finished descent as the engine's outputs (one member)."""
    one = jnp.ones(1, jnp.int32)

    def member(tree):
        return jax.tree.map(lambda x: x[None], tree)

    return _engine.Outputs(
        ts=jnp.asarray(ts)[None], loss=state.loss[None],
        grad_norm=state.grad_norm[None], metrics=member(state.metrics),
        params=member(state.saved), velocity=member(state.velocity),
        n_rows=one * ts.size, code=one * result_code("successful"),
        steps=one * state.steps, accepted=one * state.steps, grads=one * state.steps,
        row_grads=one * ts.size, hvps=0 * one,
    )  # fmt: skip


class Comparison(eqx.Module):
    """Two trajectories compared at their common save times (see `gflow.compare`).

    Attributes:
        ts: the common save times.
        param_distance: `‖θ_b(t) − θ_a(t)‖ / max(‖θ_a(t)‖, ‖θ_b(t)‖)` over all
            parameters (0 where both are zero).
        loss_gap: `L_b(t) − L_a(t)`.
        tol: the tolerance used for `first_difference_time`.
        first_difference_time: the first common time at which `param_distance`
            exceeds `tol`, or None if it never does.
    """

    ts: np.ndarray
    param_distance: np.ndarray
    loss_gap: np.ndarray
    tol: float
    first_difference_time: float | None

    @property
    def max_param_distance(self) -> float:
        return float(np.max(self.param_distance))

    @property
    def max_loss_gap(self) -> float:
        return float(np.max(np.abs(self.loss_gap)))


def compare(a: Trajectory, b: Trajectory, *, tol: float = 1e-2) -> Comparison:
    """Compare trajectory `b` with the reference `a` at their common save times.

    Times are matched to a relative 1e-9, so run both with the same `ts` (gradient
    descent rounds its save times to whole steps: pass its `gd.ts` to `simulate`).

    Args:
        a: the reference (e.g. the flow).
        b: the other run (e.g. gradient descent).
        tol: the relative parameter distance that counts as "differing".

    Returns:
        A `Comparison` with `ts`, `param_distance`, `loss_gap` and
        `first_difference_time`.

    Raises:
        ValueError: different parameter structures or shapes, or fewer than two
            common save times.

    Example:
        >>> gd = gflow.gradient_descent(model, data, 100.0, lr=0.1, key=0)
        >>> flow = gflow.simulate(model, data, 100.0, key=0, ts=gd.ts)
        >>> c = gflow.compare(flow, gd, tol=1e-3)
        >>> c.first_difference_time, c.max_param_distance
    """
    if not isinstance(a, Trajectory) or not isinstance(b, Trajectory):
        raise TypeError("compare(a, b) takes two gflow.Trajectory objects.")
    require_positive("tol", tol)
    # Compared: the trained leaves (floating-point arrays), in the same structure.
    trained_a = eqx.filter(a.params, eqx.is_inexact_array)
    trained_b = eqx.filter(b.params, eqx.is_inexact_array)
    shapes_a = jax.tree.map(lambda x: x.shape[1:], trained_a)
    shapes_b = jax.tree.map(lambda x: x.shape[1:], trained_b)
    if jax.tree.structure(shapes_a) != jax.tree.structure(shapes_b) or (
        jax.tree.leaves(shapes_a) != jax.tree.leaves(shapes_b)
    ):
        raise ValueError("the two trajectories have different parameter structures.")
    # The times at which both hold parameters (every save unless params_at=...).
    ts_a = np.asarray(a.ts, dtype=np.float64)[a.param_rows]
    ts_b = np.asarray(b.ts, dtype=np.float64)[b.param_rows]
    j = np.clip(np.searchsorted(ts_b, ts_a), 0, len(ts_b) - 1)
    j_left = np.clip(j - 1, 0, len(ts_b) - 1)
    j = np.where(np.abs(ts_b[j_left] - ts_a) < np.abs(ts_b[j] - ts_a), j_left, j)
    match = np.isclose(ts_b[j], ts_a, rtol=1e-9, atol=1e-12)
    if match.sum() < 2:
        raise ValueError(
            "the trajectories share fewer than two save times with parameters; run "
            "both with the same `ts` (e.g. simulate(..., ts=gd.ts)) and "
            "params_at='all'."
        )
    i, j = np.nonzero(match)[0], j[match]

    def flat(traj, rows):
        leaves = [
            np.asarray(x)[rows].reshape(len(rows), -1)
            for x in jax.tree.leaves(eqx.filter(traj.params, eqx.is_inexact_array))
        ]
        return np.concatenate(leaves, axis=1).astype(np.float64)

    theta_a, theta_b = flat(a, i), flat(b, j)
    # Relative to the larger of the two norms, and 0 where both are zero (e.g.
    # parameters that start at zero), so the measure is always defined.
    scale = np.maximum(np.linalg.norm(theta_a, axis=1), np.linalg.norm(theta_b, axis=1))
    gap = np.linalg.norm(theta_b - theta_a, axis=1)
    distance = np.where(scale > 0, gap / np.where(scale > 0, scale, 1.0), 0.0)
    loss_gap = (np.asarray(b.loss, np.float64)[b.param_rows[j]]
                - np.asarray(a.loss, np.float64)[a.param_rows[i]])  # fmt: skip
    over = np.nonzero(distance > tol)[0]
    return Comparison(
        ts=ts_a[i],
        param_distance=distance,
        loss_gap=loss_gap,
        tol=float(tol),
        first_difference_time=float(ts_a[i][over[0]]) if len(over) else None,
    )
