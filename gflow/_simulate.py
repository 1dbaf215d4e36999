"""simulate(): the gradient flow dθ/dt = -∇L(θ; data), solved by diffrax under JIT."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from ._compile import CompileTimer
from ._errors import SimulationError
from ._model import LossFn, initial_params, resolve_loss
from ._run import (
    check_metrics,
    checked_loss,
    evaluate_saves,
    gflow_version,
    make_trajectory,
    matmul_precision_context,
    positive_finite,
)
from ._solvers import (
    grad_evals_per_step,
    initial_grad_evals,
    is_adaptive,
    resolve_solver,
)
from ._times import check_t_max, resolve_save_times
from ._trajectory import Trajectory
from ._tree import tree_norm

#: Why a solve ended, indexed by the `outcome` code `integrate_flow` returns.
RESULT_NAMES = (
    "successful",
    "stopped_at_loss",
    "stopped_at_grad_norm",
    "stopped_by_condition",
    "max_steps_reached",
    "diverged",
    "dt_min_reached",
    "solver_failed",
)


class _Config(eqx.Module):
    """Everything the compiled solve depends on besides params0, data and ts.

    Python values (solver, flags, counts, functions) are static: changing them
    recompiles. Tolerances and thresholds are arrays, so sweeping them does not.
    """

    solver: diffrax.AbstractSolver
    adaptive: bool = eqx.field(static=True)
    rtol: jax.Array
    atol: jax.Array
    dt0: jax.Array | None
    max_steps: int = eqx.field(static=True)
    stop_at_loss: jax.Array | None
    stop_at_grad_norm: jax.Array | None
    stop_when: Callable | None = eqx.field(static=True)
    metrics: tuple[tuple[str, Callable], ...] = eqx.field(static=True)
    progress: bool = eqx.field(static=True)


def simulate(
    model: Any,
    data: Any,
    t_max: float,
    *,
    params0: Any = None,
    key: Any = None,
    ts: Any = None,
    n_save: int = 101,
    spacing: Literal["log", "linear"] = "log",
    solver: str | diffrax.AbstractSolver = "tsit5",
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    max_steps: int = 100_000,
    metrics: Mapping[str, Callable[[Any, Any], Any]] | None = None,
    stop_at_loss: float | None = None,
    stop_at_grad_norm: float | None = None,
    stop_when: Callable[[Any, Any], Any] | None = None,
    throw: bool = True,
    progress: bool = False,
    matmul_precision: str | None = "highest",
) -> Trajectory:
    """Solve the gradient flow `dθ/dt = -∇θ L(θ; data)` from `t = 0` to `t_max`.

    The whole solve (the adaptive time loop, the interpolation at the save times, and
    the loss, gradient norm and metrics of every saved state) is one compiled
    program. `data` is an argument of that program, never a constant inside it:
    calling again with new data or new initial parameters of the same shapes and
    dtypes reuses the compiled program (`stats["compiled"]` is then False).

    Precision follows JAX: float32 by default, float64 after
    `jax.config.update("jax_enable_x64", True)` (and float64 parameters). Relative
    tolerances below about 1e-7 need float64.

    Args:
        model: an object with `loss(params, data) -> scalar` (and `init(key) ->
            params` when `params0` is not given), or a plain function
            `loss(params, data)` together with `params0`.
        data: the data, passed to the loss unchanged (any pytree, or None).
        t_max: the final gradient-flow time (positive). Gradient descent with
            learning rate `lr` reaches time `t = k * lr` after `k` steps.
        params0: initial parameters, a pytree of floating-point arrays.
        key: an int seed or `jax.random.key`, for `model.init` when `params0` is None.
        ts: explicit save times: a strictly increasing 1-D array from 0 to `t_max`.
        n_save: number of save times when `ts` is not given (default 101).
        spacing: `"log"` (default: 0, then geometrically spaced from `t_max * 1e-4`
            to `t_max`; see `gflow.save_times`) or `"linear"`.
        solver: `"tsit5"` (default), `"dopri5"`, `"dopri8"`, `"bosh3"`, `"heun"`,
            `"kvaerno5"` (implicit, for stiff flows; far slower on large models),
            `"euler"` (fixed step `dt0`: exactly gradient descent with learning rate
            `dt0`), or any diffrax solver instance.
        rtol, atol: tolerances of the adaptive step-size (PID) controller.
        dt0: the first step for adaptive solvers (default: chosen automatically);
            the fixed step for fixed-step solvers such as `"euler"` (required).
        max_steps: the most solver steps allowed before giving up.
        metrics: `{name: fn(params, data)}`, each evaluated on every saved state;
            results in `traj.metrics[name]` with a leading time axis. Define the
            functions once and reuse them: a new function object recompiles.
        stop_at_loss: stop where the loss first falls to this value (located to
            round-off within the step by a Newton root find on the solver's dense
            output). Costs one loss evaluation per step.
        stop_at_grad_norm: stop at the end of the first step where the gradient
            norm is at most this value. Costs one gradient per step (counted in
            `num_grad_evals`).
        stop_when: `fn(params, data) -> bool`: stop at the end of the first step
            where it holds (e.g. a model's `phase_spec.alignment`, to stop at the
            end of Phase 1). Evaluated once per step.
        throw: raise `gflow.SimulationError` when the solve fails (max_steps
            reached, divergence to inf/NaN, step size collapse). With False the
            trajectory up to the failure is returned and `traj.result` says why.
        progress: show a progress bar (tqdm if installed, else text).
        matmul_precision: the precision of float32 matrix products inside the solve
            (`jax.default_matmul_precision`). The default `"highest"` computes them
            in full float32: on GPUs JAX otherwise uses TF32 (about 1e-3 relative
            error), whose noise makes the adaptive step control reject step after
            step (measured on an H100: 3,890 steps instead of 93 for the
            quickstart). None keeps JAX's default. No effect on CPUs.

    Returns:
        A [`gflow.Trajectory`][]: `ts`, `params` (leading time axis), `loss`,
        `grad_norm`, `velocity`, `metrics`, `result`, `stats`, `meta`.
        `stats["num_grad_evals"]` counts every gradient the call evaluated: solver
        stages, the save-time post-pass and stopping checks (not counted for implicit
        solvers, whose Newton iterations vary: then None).

    Raises:
        ValueError, TypeError: bad arguments (the message names the argument).
        SimulationError: the solve failed and `throw=True`.

    Example:
        >>> import jax.numpy as jnp, gflow
        >>> def loss(params, data):
        ...     return 0.5 * jnp.sum((params["w"] - data) ** 2)
        >>> traj = gflow.simulate(loss, jnp.ones(3), 5.0, params0={"w": jnp.zeros(3)})
        >>> traj.final["w"]  # 1 - exp(-5)
        Array([0.993262, 0.993262, 0.993262], dtype=float32)
    """
    loss_fn = resolve_loss(model)
    t_max = check_t_max(t_max)
    ts_np = resolve_save_times(t_max, ts, n_save, spacing)
    params0, seed = initial_params(model, params0, key)
    dtype = jnp.result_type(*jax.tree.leaves(params0))
    solver_obj = resolve_solver(solver)
    config = make_config(
        solver_obj,
        dtype,
        rtol,
        atol,
        dt0,
        max_steps,
        metrics,
        stop_at_loss,
        stop_at_grad_norm,
        stop_when,
        progress,
    )
    ts_arr = jnp.asarray(ts_np, dtype=dtype)

    precision = matmul_precision_context(matmul_precision)
    with CompileTimer() as timer, precision:
        out = jax.block_until_ready(_solve(loss_fn, params0, data, ts_arr, config))

    meta = flow_meta(
        "flow", solver_obj, config, rtol, atol, dt0, dtype, t_max, matmul_precision
    )
    meta["seed"] = seed
    traj = _assemble(out, ts_np, config, solver_obj, timer, meta)
    if throw and not traj.succeeded:
        raise SimulationError(_failure_message(traj, t_max), traj.result, traj)
    return traj


def flow_meta(
    kind, solver, config, rtol, atol, dt0, dtype, t_max, matmul_precision
) -> dict[str, Any]:
    """How a flow was made (Trajectory.meta), shared by simulate and ensembles."""
    return {
        "gflow_version": gflow_version(),
        "kind": kind,
        "solver": type(solver).__name__,
        "rtol": float(rtol) if config.adaptive else None,
        "atol": float(atol) if config.adaptive else None,
        "dt0": None if dt0 is None else float(dt0),
        "max_steps": config.max_steps,
        "dtype": str(dtype),
        "t_max": t_max,
        "matmul_precision": matmul_precision,
        "backend": jax.default_backend(),
    }


def make_config(
    solver,
    dtype,
    rtol,
    atol,
    dt0,
    max_steps,
    metrics,
    stop_at_loss,
    stop_at_grad_norm,
    stop_when,
    progress,
) -> _Config:
    """Validate the solver options and pack them for the compiled solve."""
    adaptive = is_adaptive(solver)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not positive_finite(value):
            raise ValueError(
                f"`{name}` must be a positive finite number; got {value!r}."
            )
    if adaptive and rtol < 1e-7 and dtype == jnp.float32:
        warnings.warn(
            f"rtol={rtol} is below float32 resolution (~1e-7): the solver may take "
            "tiny steps or stall. Enable float64 (jax.config.update("
            "'jax_enable_x64', True) and float64 parameters) or raise rtol.",
            stacklevel=3,
        )
    if dt0 is not None and not positive_finite(dt0):
        raise ValueError(f"`dt0` must be a positive finite number; got {dt0!r}.")
    if not adaptive and dt0 is None:
        raise ValueError(
            f"solver {type(solver).__name__} has a fixed step size: pass `dt0=` "
            "(for 'euler', the learning rate of the gradient descent it equals)."
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer):
        raise TypeError(f"`max_steps` must be an int; got {type(max_steps).__name__}.")
    if max_steps < 1:
        raise ValueError(f"`max_steps` must be at least 1; got {max_steps}.")
    for name, value in (
        ("stop_at_loss", stop_at_loss),
        ("stop_at_grad_norm", stop_at_grad_norm),
    ):
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(
                f"`{name}` must be a finite number or None; got {value!r}."
            )
    if stop_at_grad_norm is not None and stop_at_grad_norm <= 0:
        raise ValueError(
            f"`stop_at_grad_norm` must be positive; got {stop_at_grad_norm!r}."
        )
    metrics = check_metrics(metrics)
    if stop_when is not None and not callable(stop_when):
        raise TypeError("`stop_when` must be a function fn(params, data) -> bool.")

    def array(x):
        return None if x is None else jnp.asarray(x, dtype=dtype)

    return _Config(
        solver=solver,
        adaptive=adaptive,
        rtol=array(rtol),
        atol=array(atol),
        dt0=array(dt0),
        max_steps=int(max_steps),
        stop_at_loss=array(stop_at_loss),
        stop_at_grad_norm=array(stop_at_grad_norm),
        stop_when=stop_when,
        metrics=metrics,
        progress=bool(progress),
    )


@eqx.filter_jit
def _solve(loss_fn: LossFn, params0: Any, data: Any, ts: jax.Array, config: _Config):
    sol = integrate_flow(
        loss_fn, params0, data, ts[0], ts[-1], ts, config, config.max_steps
    )
    # diffrax packs the saves: the save times reached, then the time the solve
    # ended (t_max, an event time, or where it failed), then inf padding. Give the
    # padding the final state, so the post-pass sees finite values; the host drops it.
    n_filled = jnp.sum(jnp.isfinite(sol["ts"]))
    filled = jnp.arange(sol["ts"].shape[0]) < n_filled
    ys = jax.tree.map(
        lambda y: jnp.where(
            filled.reshape((-1,) + (1,) * (y.ndim - 1)), y, y[n_filled - 1]
        ),
        sol["params"],
    )
    return dict(sol, params=ys, **evaluate_saves(loss_fn, config.metrics, ys, data))


def integrate_flow(
    loss_fn: LossFn,
    params0: Any,
    data: Any,
    t0: jax.Array,
    t1: jax.Array,
    ts: jax.Array,
    config: _Config,
    max_steps: int,
) -> dict[str, Any]:
    """The flow from `t0` to `t1`, saved at `ts` (in `[t0, t1]`, non-decreasing),
    for at most `max_steps` steps.

    Traceable (not jitted itself): `simulate` jits it, `simulate_ensemble` vmaps
    it over the members first. Returns diffrax's packed saves (`ts`, `params`: the
    save times reached, then where the solve ended, then inf padding), the
    `outcome` code (an index in `RESULT_NAMES`) and the solver counters.
    """
    checked_loss(loss_fn, params0, data)
    grad_fn = jax.grad(loss_fn)

    def vector_field(t, y, args):
        return jax.tree.map(jnp.negative, grad_fn(y, args))

    conds = {}
    if config.stop_at_loss is not None:

        def loss_cond(t, y, args, **kwargs):
            return loss_fn(y, args) - config.stop_at_loss

        conds["loss"] = loss_cond
    if config.stop_at_grad_norm is not None:

        def grad_cond(t, y, args, **kwargs):
            return tree_norm(grad_fn(y, args)) <= config.stop_at_grad_norm

        conds["grad_norm"] = grad_cond
    if config.stop_when is not None:

        def user_cond(t, y, args, **kwargs):
            return jnp.asarray(config.stop_when(y, args), dtype=bool)

        conds["condition"] = user_cond
    event = None
    if conds:
        # Only the loss threshold is a real-valued condition to locate by root
        # finding; tracing a root finder for boolean ones would only cost compile time.
        tol = 1e-10 if ts.dtype == jnp.float64 else 1e-5
        finder = optx.Newton(rtol=tol, atol=tol) if "loss" in conds else None
        event = diffrax.Event(conds, root_finder=finder)

    if config.adaptive:
        controller = diffrax.PIDController(rtol=config.rtol, atol=config.atol)
    else:
        controller = diffrax.ConstantStepSize()
    if config.progress:
        try:
            meter = diffrax.TqdmProgressMeter()
        except ImportError:
            meter = diffrax.TextProgressMeter()
    else:
        meter = diffrax.NoProgressMeter()

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        config.solver,
        t0=t0,
        t1=t1,
        dt0=config.dt0,
        y0=params0,
        args=data,
        saveat=diffrax.SaveAt(ts=ts, t1=True),
        stepsize_controller=controller,
        event=event,
        max_steps=max_steps,
        throw=False,
        progress_meter=meter,
    )
    return dict(
        ts=sol.ts,
        params=sol.ys,
        outcome=_outcome(sol.result, {} if event is None else sol.event_mask),
        stats=sol.stats,
    )


def _outcome(result, event_mask: dict[str, jax.Array]) -> jax.Array:
    """The index in `RESULT_NAMES` of why the solve ended (traceable, so it works
    per member under vmap)."""
    results = diffrax.RESULTS
    stopped = result == results.event_occurred
    cases = [
        (result == results.successful, 0),
        (stopped & event_mask.get("loss", False), 1),
        (stopped & event_mask.get("grad_norm", False), 2),
        (stopped & event_mask.get("condition", False), 3),
        (result == results.max_steps_reached, 4),
        (result == results.nonfinite, 5),
        (result == results.dt_min_reached, 6),
    ]
    return jnp.select([c for c, _ in cases], [jnp.int32(i) for _, i in cases], 7)


def _assemble(out, ts_np, config, solver, timer, meta) -> Trajectory:
    """Host side: keep the valid rows, name the outcome, count the work."""
    saved_ts = np.asarray(out["ts"])
    n_filled = int(np.sum(np.isfinite(saved_ts)))
    # Rows: the save times reached, then the end time unless it is the last of them.
    rows = list(range(n_filled - 1))
    if not rows or saved_ts[n_filled - 1] > saved_ts[rows[-1]]:
        rows.append(n_filled - 1)
    stats = _stats(out["stats"], config, solver, len(ts_np) + 1)
    result = RESULT_NAMES[int(out["outcome"])]
    return make_trajectory(out, rows, result, stats, timer, meta)


def _stats(solver_stats, config, solver, n_saved) -> dict[str, Any]:
    num_steps = int(solver_stats["num_steps"])
    per_step = grad_evals_per_step(solver)
    stats = {
        "num_steps": num_steps,
        "num_accepted_steps": int(solver_stats["num_accepted_steps"]),
        "num_rejected_steps": int(solver_stats["num_rejected_steps"]),
        "num_save_grad_evals": n_saved,
    }
    if per_step is None:
        stats["num_solver_grad_evals"] = None
        stats["num_grad_evals"] = None
        return stats
    solver_evals = per_step * num_steps + initial_grad_evals(solver)
    # The grad-norm stopping check runs once at the start and after every step.
    event_evals = num_steps + 1 if config.stop_at_grad_norm is not None else 0
    stats["num_solver_grad_evals"] = solver_evals
    stats["num_grad_evals"] = solver_evals + n_saved + event_evals
    return stats


def _failure_message(traj: Trajectory, t_max: float) -> str:
    t_end = float(traj.ts[-1]) if len(traj) else 0.0
    where = (
        f"at t = {t_end:.8g} of t_max = {t_max:g} (loss {float(traj.loss[-1]):.6g}, "
        f"|grad| {float(traj.grad_norm[-1]):.3g})"
        if len(traj)
        else "before the first save"
    )
    hints = {
        "max_steps_reached": (
            f"the solver used all max_steps={traj.meta['max_steps']} steps {where}. "
            "Raise `max_steps`, loosen rtol/atol, or, if the step size collapsed "
            "because the flow is stiff, try solver='kvaerno5'. If the loss or "
            "|grad| is exploding, the flow itself may blow up in finite time."
        ),
        "diverged": (
            f"the flow diverged: the loss or the parameters became inf/NaN after the "
            f"last finite save {where}. Check the loss for overflow (use float64: "
            "jax.config.update('jax_enable_x64', True)), tighten rtol/atol, or "
            "shorten t_max."
        ),
        "dt_min_reached": (
            f"the step size fell below its minimum {where}. Use float64 or a stiff "
            "solver (solver='kvaerno5')."
        ),
    }
    reason = hints.get(traj.result, f"the solver failed ({traj.result}) {where}.")
    return (
        f"gflow.simulate: {reason} Pass throw=False to get the trajectory up to "
        "this point."
    )
