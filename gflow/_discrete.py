"""gradient_descent(): discrete optimisers on the gradient flow's time axis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from . import _checkpoint
from ._assemble import assemble, finish
from ._checks import check_batch_size, check_keys, require_positive
from ._engine import Metrics, Outputs, Row, if_any, row_from, row_values
from ._keywords import CHECKPOINT_KEYWORDS, COMMON_KEYWORDS, takes_options
from ._options import Options, matmul_precision_context
from ._prepare import fixed_class, padded_saves, prepare
from ._results import result_code
from ._run import Segments, run_in_segments
from ._trajectory import Trajectory
from ._tree import tree_set, tree_zeros
from .flows import FlowState, GradientFlow
from .flows._base import grad, value_and_grad
from .optimizers import AbstractOptimizer
from .optimizers._optimizers import describe


@takes_options(*COMMON_KEYWORDS, *CHECKPOINT_KEYWORDS)
def gradient_descent(
    model: Any,
    data: Any,
    t_max: float,
    lr: float | None = None,
    *,
    params0: Any = None,
    key: Any = None,
    optimizer: AbstractOptimizer | optax.GradientTransformation | None = None,
    time_per_step: float | None = None,
    batch_size: int | None = None,
    batch_key: Any = None,
    **options: Any,
) -> Trajectory:
    """Gradient descent (or any optax optimiser) on the gradient flow's time axis.

    Step k sits at flow time `t = k * time_per_step`, by default `k * lr`: plain
    gradient descent with learning rate `lr` is the Euler discretisation of the flow
    with step `lr`. All steps run in one compiled program (a loop over the steps
    that writes the saved rows on its way); `data` and `lr` are arguments of it,
    so new data, initial parameters or learning rates of the same shapes do not
    recompile.

    An optimiser of `gflow.optimizers` (`GD`, `HeavyBall`, `Nesterov`, `RMSProp`,
    `Adam`, `NAdam`) runs exactly as optax's, with step k at t = k·`base_lr` (its
    learning rate), the time axis of its continuous models
    `gflow.flows.StableFlow(optimizer)` and `gflow.flows.RodFlow(optimizer)`;
    the optimiser's moments are saved at the parameter rows (`traj.state`,
    named as those flows name them), from which a flow can be restarted
    (`moments0=`, `step0=`). For an optax transformation, `lr` sets
    the time per step; other conventions go in `time_per_step` (heavy-ball
    momentum μ at rate α moves about α / (1 − μ) of flow time per step once its
    velocity has built up: `gflow.flows.HeavyBall`'s axis). Continuous models of
    gradient descent at finite `lr` and of minibatch SGD are
    `gflow.flows.ModifiedGD` and `gflow.flows.SGD`.

    Args:
        model: as in [`gflow.simulate`][].
        data: as in `gflow.simulate`.
        t_max: the final time; the run takes the most whole steps that fit in it,
            `floor(t_max / time_per_step)`: its last row is at that step's time,
            at or before `t_max`.
        lr: the learning rate of plain gradient descent (and the default time per
            step); with an optax `optimizer`, the time per step only; not given
            with a `gflow.optimizers` optimiser, which has its own.
        params0: as in `gflow.simulate`.
        key: as in `gflow.simulate`.
        optimizer: a `gflow.optimizers` optimiser (new hyperparameter values
            reuse the compiled program), or an optax `GradientTransformation`
            (reuse the same object across calls to avoid recompiling), instead
            of plain gradient descent.
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
        `stats["num_grad_evals"]` = steps + 1 (a saved row reuses the gradient
        of the step it starts; with `batch_size`, steps + saved rows, since a row
        is on all the data). If the iterates become
        inf/NaN (a learning rate above 2 / sharpness), `result` is `"diverged"`
        and the trajectory ends at the last finite save.

    Examples:
        >>> gd = gflow.gradient_descent(model, data, 300.0, lr=0.01, key=0)
        >>> flow = gflow.simulate(model, data, 300.0, key=0, ts=gd.ts)
        >>> gflow.compare(flow, gd).max_param_distance
    """
    lr, tau = _checked_rates(lr, optimizer, time_per_step)
    batches = _batches(batch_size, batch_key, data)
    prepared = prepare(
        "gradient_descent",
        model,
        data,
        t_max,
        options,
        gradient_descent.__gflow_keywords__,
        params0=params0,
        key=key,
        flows=False,
    )
    steps, opts = _on_whole_steps(prepared.opts, tau)
    problem = Descent(prepared.loss_fn, optimizer, opts.metrics, batches)
    # Padded to the number of saves asked for, not to those left once saves on
    # the same step are merged: every learning rate then shares the program.
    ts, slot, n_slots = padded_saves(
        opts.saves, asked=prepared.opts.saves, fixed_class=fixed_class(prepared)
    )
    save_steps = np.full(ts.shape, steps[-1], np.int32)
    save_steps[: steps.size] = steps
    controls = DescentControls(
        save_steps=save_steps,
        n_saves=np.asarray(steps.size, np.int32),
        slot=slot,
        lr=np.asarray(lr, np.dtype(prepared.dtype)),
    )
    meta = dict(
        prepared.meta("discrete"),
        solver=_describe_optimizer(optimizer),
        lr=float(lr),
        time_per_step=tau,
        t_max=int(steps[-1]) * tau,
        batch_size=batch_size,
    )
    state, timing, stats = _run(
        problem, controls, prepared, data, opts, meta, model, n_slots
    )
    # In full batch a saved row reuses its step's gradient; only the last row,
    # after the last step, evaluates one of its own.
    row_grads = 1 if batches is None else steps.size
    out = _outputs(
        state,
        prepared.params0,
        _blank_moments(problem, prepared.params0),
        (save_steps * tau).astype(prepared.dtype),
        steps.size,
        row_grads,
    )
    traj = assemble(
        out, opts, meta, timing, batched=False, fixed=prepared.fixed, stats=stats
    )
    inputs = {"params0": prepared.params0, "data": data}
    return finish(traj, "gradient_descent", opts.throw, "discrete", inputs)


def _on_whole_steps(opts: Options, tau: float) -> tuple[np.ndarray, Options]:
    """The step of each save time (rounded to the nearest whole step, duplicates
    dropped, the last save on the last step), and the options saving there."""
    # The whole steps that fit in t_max (with a margin for the rounding of
    # t_max / tau): the last one lands at or before t_max, so that a flow can be
    # saved at the same times (`ts=gd.ts`) whatever the learning rate.
    n_steps = int(np.floor(opts.saves.t_max / tau * (1 + 1e-12)))
    if n_steps < 1:
        raise ValueError(
            f"t_max = {opts.saves.t_max} is less than one step of {tau}: raise t_max "
            "or lower lr."
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
    return steps, opts


def _run(problem, controls, prepared, data, opts: Options, meta, model, n_slots):
    """Descend to the last save, in one call or in checkpointed segments; the final
    state, the timing and the checkpoint's counters."""
    n_saves = int(controls.n_saves)

    def fresh():
        return _blank(problem, controls, prepared.params0, data, n_slots)

    def advance(state, budget):
        return _descend(problem, controls, state, data, np.asarray(budget, np.int32))

    segments = Segments()
    saving = opts.checkpointing
    if saving.folder is not None:
        call = _checkpoint.describe(
            model, opts, meta, optimizer=repr(problem.optimizer)
        )
        stamp = _checkpoint.fingerprint(
            "gradient_descent",
            call,
            prepared.params0,
            eqx.filter(prepared.fixed, eqx.is_array),
            data,
            controls.save_steps,
            problem.batches,
        )
        segments = Segments(saving.folder, stamp, saving.every_s, saving.every_steps)
    with matmul_precision_context(opts.matmul_precision):
        return run_in_segments(
            fresh,
            advance,
            lambda s: int(s.next_save) >= n_saves,
            lambda s: int(s.steps),
            segments,
        )


def _checked_rates(lr, optimizer, time_per_step) -> tuple[float, float]:
    """The learning rate (a `gflow.optimizers` optimiser's own) and the flow time
    per step, checked with the optimiser."""
    if isinstance(optimizer, AbstractOptimizer):
        if lr is not None:
            raise ValueError(
                f"`lr` is the optimiser's own ({type(optimizer).__name__}(lr, ...)): "
                "do not pass it to gradient_descent as well."
            )
        lr = float(optimizer.base_lr)
    elif optimizer is not None and not isinstance(
        optimizer, optax.GradientTransformation
    ):
        raise TypeError(
            "`optimizer` must be one of gflow.optimizers (GD, HeavyBall, Nesterov, "
            "RMSProp, Adam, NAdam) or an optax.GradientTransformation; got "
            f"{type(optimizer).__name__}."
        )
    elif lr is None:
        raise TypeError(
            "gradient_descent needs `lr` (or an optimizer of gflow.optimizers, "
            "which has its own)."
        )
    require_positive("lr", lr)
    tau = float(lr) if time_per_step is None else time_per_step
    require_positive("time_per_step", tau)
    return float(lr), float(tau)


def _describe_optimizer(optimizer) -> str:
    """What took the steps, for `Trajectory.meta`."""
    if optimizer is None:
        return "gradient_descent"
    if isinstance(optimizer, AbstractOptimizer):
        return describe(optimizer)
    return "optax"


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
    key = jax.random.key_data(check_keys("batch_key", batch_key, None))
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


class Descent(eqx.Module):
    """What gradient descent runs: its loss (on the trained leaves), the optimiser
    (None: plain gradient descent), the metrics of the saved rows and the
    minibatches (None: full batch). Changing it recompiles; `DescentControls`
    do not."""

    loss_fn: Callable
    optimizer: AbstractOptimizer | optax.GradientTransformation | None
    metrics: Metrics
    batches: _Batches | None

    def gradient(self, k, params, data):
        """The gradient that step `k` takes from `params`, with the loss when it
        is on all the data (None for a minibatch)."""
        if self.batches is not None:
            return grad(self.loss_fn, params, self.batches.draw(data, k)), None
        loss, grads = value_and_grad(self.loss_fn, params, data)
        return grads, loss

    def row(self, params, data, grads, loss, at_save, from_last) -> Row:
        """The saved row at `params` (meaningful where `at_save`). In full batch
        it reuses the step's gradient, so that the program holds one gradient
        and a row costs no evaluation; it is then computed at every step, being
        cheap, unless metrics (or a minibatch step) make it worth a branch."""
        # (The gradient flow's rows do not depend on the time: none is given.)
        flow, state = GradientFlow(), FlowState(params)

        def full():
            if loss is None:
                return row_values(
                    self.loss_fn, flow, self.metrics, None, state, None, data, from_last
                )
            return row_from(
                self.loss_fn,
                flow,
                self.metrics,
                None,
                state,
                None,
                data,
                from_last,
                loss,
                grads,
            )

        if loss is not None and not self.metrics.fns:
            return full()
        return if_any(at_save, full)

    def moments(self, opt_state) -> Any:
        """The optimiser's moments in `opt_state`, as its flows name them
        (`Trajectory.state`); none for plain gradient descent or a bare optax
        transformation."""
        if isinstance(self.optimizer, AbstractOptimizer):
            return self.optimizer.moments_of(opt_state)
        return {}

    def update(self, params, opt_state, grads, lr):
        """One step along `grads`: (params, optimiser state)."""
        if self.optimizer is None:
            return jax.tree.map(lambda p, g: p - lr * g, params, grads), opt_state
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


class DescentControls(eqx.Module):
    """The numbers of a descent: arrays, so new values reuse the compiled program.
    The save steps are padded to a size class (with the last step), as a flow's
    save times are."""

    save_steps: jax.Array  # (T,) int32: the step of each save row
    n_saves: jax.Array  # () int32: how many of them are real
    slot: jax.Array  # (T,) int32: the parameter slot of each save row
    lr: jax.Array


class _State(eqx.Module):
    """Gradient descent part-way: the loop's carry, everything needed to go on.
    The kept parameters and velocities are flat vectors, one row per slot and a
    last one that takes the rows not kept: one write each per step instead of
    one per leaf, which is most of what XLA would otherwise compile."""

    params: Any
    opt_state: Any
    saved: jax.Array  # (n_slots + 1, n): the parameters of the kept rows
    velocity: jax.Array  # (n_slots + 1, n)
    moments: jax.Array  # (n_slots + 1, m): the optimiser's moments there
    loss: jax.Array  # (n_saves + 1,): every save row, and a spare last one
    grad_norm: jax.Array  # (n_saves + 1,)
    metrics: Any  # (n_saves, ...)
    metrics_carried: Any  # what the carried metrics left the next save row
    next_save: jax.Array  # the next save row to write (0: nothing ran yet)
    steps: jax.Array  # steps taken


def _unflat(rows: np.ndarray, like) -> Any:
    """`rows` (m, n) of flat vectors (`ravel_pytree`'s) back to trees like
    `like`, with a leading axis of m; on the host."""
    leaves, layout = jax.tree.flatten(like)
    if not leaves:
        return like
    ends = np.cumsum([np.size(x) for x in leaves])
    parts = np.split(np.asarray(rows), ends[:-1], axis=1)
    return jax.tree.unflatten(
        layout,
        [
            p.reshape(rows.shape[:1] + np.shape(x)).astype(x.dtype)
            for p, x in zip(parts, leaves, strict=True)
        ],
    )


def _blank(problem: Descent, controls: DescentControls, params0, data, n_slots: int):
    """The state before anything ran, on the host (nothing compiles): at the
    initial parameters, with no row written yet."""
    optimizer = problem.optimizer
    opt_state = None
    if optimizer is not None:
        opt_state = tree_zeros(eqx.filter_eval_shape(optimizer.init, params0), xp=np)
    moments = problem.moments(opt_state)
    leaves = jax.tree.leaves(params0)
    dtype = np.result_type(*(x.dtype for x in leaves))
    n = sum(np.size(x) for x in leaves)
    # The loss's dtype, from the shapes of the jitted gradient: its trace is then
    # the one the loop uses, not a second one.
    loss, _ = eqx.filter_eval_shape(value_and_grad, problem.loss_fn, params0, data)
    metrics, carried = {}, {}
    if problem.metrics.fns:
        metrics = problem.metrics.shapes(params0, data)
        carried = eqx.filter_eval_shape(problem.metrics.init, params0, data)
    n_saves = controls.save_steps.shape[0]
    zero = np.zeros((), np.int32)
    return _State(
        params=params0,
        opt_state=opt_state,
        saved=np.zeros((n_slots + 1, n), dtype),
        velocity=np.zeros((n_slots + 1, n), dtype),
        moments=np.zeros((n_slots + 1, _size(moments)), dtype),
        loss=np.zeros(n_saves + 1, loss.dtype),
        grad_norm=np.zeros(n_saves + 1, dtype),
        metrics=tree_zeros(metrics, (n_saves,), xp=np),
        metrics_carried=tree_zeros(carried, xp=np),
        next_save=zero,
        steps=zero.copy(),
    )


@eqx.filter_jit
def _descend(problem: Descent, controls: DescentControls, state: _State, data, budget):
    """Take up to `budget` steps (at least one), writing the save rows on the
    way, until the last save row is written. A fresh state starts with the
    optimiser's state."""
    save_steps, slot = controls.save_steps, controls.slot
    n_slots, n_saves = state.saved.shape[0] - 1, save_steps.shape[0]
    last = save_steps[controls.n_saves - 1]
    stop_at = state.steps + jnp.maximum(budget, 1)
    if problem.optimizer is not None:
        opt_state = jax.lax.cond(
            state.next_save == 0,
            lambda: problem.optimizer.init(state.params),
            lambda: state.opt_state,
        )
        state = eqx.tree_at(lambda s: s.opt_state, state, opt_state)
    if problem.metrics.carries:
        carried = jax.lax.cond(
            state.next_save == 0,
            lambda: problem.metrics.init(state.params, data),
            lambda: state.metrics_carried,
        )
        state = eqx.tree_at(lambda s: s.metrics_carried, state, carried)

    def going(state):
        return (state.next_save < controls.n_saves) & (state.steps < stop_at)

    def write(buffer, index, value):
        # In bounds by construction: a plain dynamic_update_slice (a scatter
        # would check the bounds, with a select over the whole buffer).
        return jax.lax.dynamic_update_index_in_dim(buffer, value, index, 0)

    def step(state):
        k, i, params = state.steps, state.next_save, state.params
        grads, loss = problem.gradient(k, params, data)
        at_save = k == save_steps[i]
        row = problem.row(params, data, grads, loss, at_save, state.metrics_carried)
        # Written at every step, into a spare last element when not at a save
        # (metrics, rarely there: dropped): no branch around the writes.
        kept = jnp.where(at_save, slot[i], n_slots)
        index = jnp.where(at_save, i, n_saves)
        # The update after the last row is taken too, and never saved: no branch.
        moments = problem.moments(state.opt_state)  # of the row, before the step
        params, opt_state = problem.update(params, state.opt_state, grads, controls.lr)
        return _State(
            params=params,
            opt_state=opt_state,
            saved=write(state.saved, kept, ravel_pytree(row.params)[0]),
            velocity=write(state.velocity, kept, ravel_pytree(row.velocity)[0]),
            moments=write(state.moments, kept, _flat_like(moments, state.moments)),
            loss=write(state.loss, index, row.loss),
            grad_norm=write(state.grad_norm, index, row.grad_norm),
            metrics=tree_set(state.metrics, index, row.metrics),
            metrics_carried=jax.tree.map(
                lambda new, old: jnp.where(at_save, new, old),
                row.metrics_carried,
                state.metrics_carried,
            ),
            next_save=i + at_save,
            steps=jnp.minimum(k + 1, last),
        )

    return jax.lax.while_loop(going, step, state)


def _blank_moments(problem: Descent, params0) -> Any:
    """The optimiser's moments as zeros on the host: their shapes and dtypes."""
    if problem.optimizer is None:
        return {}
    shapes = eqx.filter_eval_shape(problem.optimizer.init, params0)
    return problem.moments(tree_zeros(shapes, xp=np))


def _size(tree: Any) -> int:
    return sum(np.size(x) for x in jax.tree.leaves(tree))


def _flat_like(tree: Any, buffer: jax.Array) -> jax.Array:
    """`tree`'s leaves as one flat vector in `buffer`'s dtype (a run without
    moments writes an empty one, whatever the default float is)."""
    return ravel_pytree(tree)[0].astype(buffer.dtype)


def _outputs(
    state: _State, params0, moments0, ts, n_saves: int, row_grads: int
) -> Outputs:
    """The finished descent as the engine's outputs (one member); `moments0`
    the optimiser's moments at the start (their shapes)."""
    one = np.ones(1, np.int32)
    state = jax.device_get(state)

    def member(tree):
        return jax.tree.map(lambda x: x[None], tree)

    return Outputs(
        ts=np.asarray(ts)[None],
        loss=member(state.loss[:-1]),
        grad_norm=member(state.grad_norm[:-1]),
        metrics=member(state.metrics),
        params=member(_unflat(state.saved[:-1], params0)),
        velocity=member(_unflat(state.velocity[:-1], params0)),
        state=member(_unflat(state.moments[:-1], moments0)),
        n_rows=one * n_saves,
        code=one * result_code("successful"),
        steps=one * int(state.steps),
        accepted=one * int(state.steps),
        grads=one * int(state.steps),
        row_grads=one * row_grads,
        hvps=0 * one,
        thirds=0 * one,
    )
