"""What every flow run shares: the compiled problem built from the options, the run
itself (timed, under the requested matmul precision), and the Trajectory assembled
on the host from the engine's outputs."""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _checkpoint, _engine
from ._compile import CompileTimer
from ._model import bind, raw_keys, split
from ._options import Options, matmul_precision_context
from ._outcome import result_code, result_names
from ._stabilized import AutoTsit5
from ._trajectory import Trajectory, take_fields
from .flows import AbstractFlow, GradientFlow
from .metrics import power_iteration

#: Iterations of the engine's loop when a run is not cut into segments.
UNBOUNDED = np.iinfo(np.int32).max


def gflow_version() -> str:
    try:
        return version("gflow")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


def trained_part(loss_fn, opts: Options, params: Any):
    """The leaves a run trains, the leaves it holds fixed, and the loss and options
    as functions of the trained leaves (the fixed ones put back inside)."""
    trained, fixed = split(params)
    opts = eqx.tree_at(
        lambda o: (o.metrics.fns, o.stopping.when),
        opts,
        (
            tuple((name, bind(fn, fixed)) for name, fn in opts.metrics.fns),
            bind(opts.stopping.when, fixed),
        ),
        is_leaf=lambda x: x is None,
    )
    return trained, fixed, bind(loss_fn, fixed), opts


def checked_loss(loss_fn, params: Any, data: Any) -> jax.ShapeDtypeStruct:
    """Trace the loss once abstractly, turning shape errors into clear ones."""
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


def checked_solver(
    opts: Options, loss_fn, flow: AbstractFlow, params: Any, data: Any
) -> Options:
    """The solver options that suit `flow` and the loss.

    An SDE flow gets Euler–Maruyama (`_sde_solver`). A flow that is not a gradient
    field is refused by the stabilized solvers, and served by Tsit5 under "auto".
    Otherwise the Hessian-vector products a stiff solver needs are lowered, in a
    power iteration as the solver runs them (some losses fail only there: a
    `jax.custom_vjp` function is refused forward-mode differentiation when lowered
    inside a loop). A loss that fails is refused with the cause, or, for `"auto"`,
    which only chooses a method for the user, served by Tsit5 with a warning (the
    options returned say so)."""
    solver = opts.solver.solver
    if flow.is_sde:
        return _sde_solver(opts, flow)
    if not getattr(solver, "uses_jvp", False):
        return opts
    if not flow.gradient_field:
        if isinstance(solver, AutoTsit5):  # "auto" chooses for the user: Tsit5
            return eqx.tree_at(lambda o: o.solver.solver, opts, diffrax.Tsit5())
        raise ValueError(
            f"solver {solver_name(solver)!r} needs a gradient field (a symmetric "
            f"Jacobian, real eigenvalues); flow {type(flow).__name__} is not one. "
            "Use solver='tsit5' (or 'auto', which runs Tsit5 for it)."
        )
    field = flow.vector_field(loss_fn)

    def top_eigenvalue(y):
        def hvp(v):
            return jax.jvp(lambda z: field(0.0, z, data), (y,), (v,))[1]

        return power_iteration(hvp, y, 1)[0]

    try:
        jax.jit(top_eigenvalue).lower(flow.initial_state(loss_fn, params, data))
    except Exception as e:  # noqa: BLE001 - re-raised with context below
        if not isinstance(solver, AutoTsit5):
            raise _no_hvp(solver, e) from e
        warnings.warn(
            "solver 'auto' falls back to 'tsit5': the Hessian-vector products it "
            f"uses to detect stiffness fail for this loss ({type(e).__name__}). "
            "Pass solver='tsit5' to silence this warning.",
            stacklevel=3,
        )
        return eqx.tree_at(lambda o: o.solver.solver, opts, diffrax.Tsit5())
    return opts


def _sde_solver(opts: Options, flow: AbstractFlow) -> Options:
    """An SDE flow runs Euler–Maruyama (Itô) at a fixed step: the default solver
    becomes diffrax's Euler at the flow's default step unless `dt0` is given."""
    solver = opts.solver
    if isinstance(solver.solver, AutoTsit5):
        dt0 = flow.default_dt0 if solver.dt0 is None else solver.dt0
        return eqx.tree_at(
            lambda o: o.solver, opts,
            type(solver)(diffrax.Euler(), solver.rtol, solver.atol, dt0,
                         solver.max_steps),
        )  # fmt: skip
    if type(solver.solver) is not diffrax.Euler:
        raise ValueError(
            f"flow {type(flow).__name__} is a stochastic differential equation (Itô), "
            "solved by Euler–Maruyama: `solver` must be 'euler' (with `dt0`) or "
            f"'auto' (Euler at dt0 = lr/4); got {solver_name(solver.solver)!r}."
        )
    return opts


def prepared_flow(flow: Any, model: Any, fixed: Any, params: Any, data: Any,
                  noise_key: Any, members: int | None):  # fmt: skip
    """The flow ready to run (`flow.prepared`), and the noise keys of the members
    as raw uint32 keys with a leading member axis (None for a flow without noise).
    `members` is None for `simulate` (one key), the batch size for an ensemble."""
    flow = resolve_flow(flow)
    flow = flow.prepared(model, lambda fn: bind(fn, fixed), params, data)
    if not flow.is_sde:
        if noise_key is not None:
            raise ValueError(
                f"`noise_key` is for flows with noise (gflow.flows.SGD); flow "
                f"{type(flow).__name__} has none."
            )
        return flow, None
    if noise_key is None:
        raise ValueError(
            f"flow {type(flow).__name__} is stochastic: pass `noise_key=` ("
            + ("jax.random.key(seed)" if members is None
               else f"jax.random.split(key, {members}): one key per member")
            + ")."
        )  # fmt: skip
    return flow, raw_keys("noise_key", noise_key, members)


def resolve_flow(flow: Any) -> AbstractFlow:
    """The flow to integrate: the gradient flow unless one is given."""
    if flow is None:
        return GradientFlow()
    if not isinstance(flow, AbstractFlow):
        raise TypeError(
            "`flow` must be a gflow.flows flow (e.g. gflow.flows.GradientFlow()); "
            f"got {type(flow).__name__}."
        )
    return flow


def _no_hvp(solver, error: Exception) -> ValueError:
    return ValueError(
        f"solver {solver_name(solver)!r} needs Hessian-vector products "
        "(forward-mode derivatives of the gradient) to measure the stiffness, and "
        f"they fail for this loss: {type(error).__name__}: {error}\nUse "
        "solver='tsit5', which needs gradients only, or write the loss with "
        "operations JAX can differentiate in forward mode (a jax.custom_vjp "
        "function has no forward mode: give it a custom_jvp instead)."
    )


def solver_name(solver) -> str:
    """The name of a solver in `gflow.SOLVERS`, or its class name."""
    from ._solvers import SOLVERS

    names = [name for name, cls in SOLVERS.items() if type(solver) is cls]
    return names[0] if names else type(solver).__name__


def checked_metrics(opts: Options, params: Any, data: Any) -> None:
    """Trace the metrics once abstractly: a metric that fails is named."""
    jax.eval_shape(opts.metrics, params, data)


def build(
    loss_fn, flow: AbstractFlow, opts: Options, dtype, *, lanes: int = 1,
    width: int = 1, progress: bool = False,
):  # fmt: skip
    """The engine's `Problem` and `Controls` for these options."""
    solver, stopping, saves = opts.solver, opts.stopping, opts.saves
    problem = _engine.Problem(
        loss_fn=loss_fn,
        flow=flow,
        solver=solver.solver,
        adaptive=solver.adaptive,
        metrics=opts.metrics,
        stop_when=stopping.when,
        lanes=lanes,
        width=width,
        progress=progress,
    )
    slot = np.full(saves.ts.shape, saves.params_at.sum(), np.int32)
    slot[saves.params_at] = np.arange(saves.params_at.sum())

    def array(x, like=dtype):
        return None if x is None else jnp.asarray(x, dtype=like)

    controls = _engine.Controls(
        ts=array(saves.ts),
        slot=jnp.asarray(slot),
        rtol=array(solver.rtol),
        atol=array(solver.atol),
        dt0=array(solver.dt0),
        stop_at_loss=array(stopping.at_loss),
        stop_at_grad_norm=array(stopping.at_grad_norm),
        max_steps=jnp.asarray(solver.max_steps, jnp.int32),
    )
    return problem, controls


def run(problem, controls, queue, data, opts: Options, *, mesh=None, n_devices=None,
        state=None, budget=UNBOUNDED):  # fmt: skip
    """Run the engine (from a fresh state unless `state` is given); returns the
    final state and the timer of the call."""
    with CompileTimer() as timer, matmul_precision_context(opts.matmul_precision):
        if state is None:
            state = _engine.fresh_state(
                problem, controls, queue, data, int(opts.saves.params_at.sum()),
                n_devices,
            )  # fmt: skip
        state = _engine.advance(
            problem, controls, queue, data, state, jnp.asarray(budget, jnp.int32), mesh
        )
        state = jax.block_until_ready(state)
    return state, timer


def run_in_segments(problem, controls, queue, data, opts: Options, stamp: str):
    """`run`, cut into segments with a checkpoint after each (`_checkpoint`),
    resumed from the checkpoint in `opts.checkpointing.folder` if there is one.
    The segments run the same compiled program as an uncut run from the same
    states, so the steps are the same bit for bit."""
    n_members = jax.tree.leaves(queue)[0].shape[0]
    saving = opts.checkpointing

    def advance(state, budget):
        return run(problem, controls, queue, data, opts, state=state, budget=budget)[0]

    def finished(state):  # every member taken from the queue, none still running
        # (On the host: a jnp reduction here would compile, inside the timer.)
        next_member, running = jax.device_get((state.next_member, state.lanes.running))
        return int(next_member) >= n_members and not np.any(running)

    def fresh():
        n_slots = int(opts.saves.params_at.sum())
        return _engine.fresh_state(problem, controls, queue, data, n_slots)

    return _checkpoint.run_in_segments(
        fresh, advance, finished, lambda state: int(state.iterations), saving.folder,
        stamp, saving.every_s, saving.every_steps,
    )  # fmt: skip


def work_stats(steps, accepted, grads, row_grads, hvps) -> dict[str, Any]:
    """The counters of runs (arrays: one entry per member): steps, gradients and
    Hessian-vector products. Solvers whose cost is not counted (implicit methods)
    report None gradients."""
    steps, accepted = np.asarray(steps), np.asarray(accepted)
    grads, row_grads = np.asarray(grads), np.asarray(row_grads)
    counted = np.all(grads >= 0)
    return {
        "num_steps": steps,
        "num_accepted_steps": accepted,
        "num_rejected_steps": steps - accepted,
        "num_solver_grad_evals": grads if counted else None,
        "num_save_grad_evals": row_grads,
        "num_grad_evals": grads + row_grads if counted else None,
        "num_hvp_evals": np.asarray(hvps),
    }


def trajectory(out: _engine.Outputs, opts: Options, meta: dict, timer, *,
               batched: bool, stats: dict | None = None,
               fixed: Any = None) -> Trajectory:  # fmt: skip
    """The Trajectory of the engine's outputs: a batch of members, or member 0.

    Each member is cut at its first row with an inf/NaN loss or parameters (its
    result becomes "diverged"); it then ends at the last row before that which holds
    parameters, so its last row always holds its final parameters. Rows past a
    member's end repeat its last row. The leaves held `fixed` are put back into the
    parameters and velocities, which keep the user's structure.
    """
    out = jax.device_get(out)
    param_rows = opts.saves.param_rows
    n_slots = len(param_rows)
    n, code = np.asarray(out.n_rows).copy(), np.asarray(out.code).copy()
    members = np.arange(n.size)[:, None]
    slots = np.arange(n_slots)
    # The row each slot holds for each member: its save row before the member's
    # last row, the last row for the final slot, none (-1) otherwise.
    slot_row = np.where(param_rows < n[:, None] - 1, param_rows, -1)
    slot_row[:, -1] = n - 1
    rows = np.arange(len(opts.saves.ts))
    ok = np.isfinite(out.loss) | (rows >= n[:, None])
    for leaf in jax.tree.leaves(out.params):
        finite = np.isfinite(leaf.reshape(leaf.shape[:2] + (-1,))).all(-1)
        bad = ~finite & (slot_row >= 0)
        ok[np.nonzero(bad)[0], slot_row[bad]] = False
    first_bad = np.where(ok.all(1), n, ok.argmin(1))
    cut = first_bad < n
    # A member cut short ends at its last row before the cut that holds parameters.
    usable = np.where((slot_row >= 0) & (slot_row < first_bad[:, None]), slot_row, -1)
    last_slot = usable.argmax(1)
    n = np.where(cut, usable.max(1) + 1, n)
    code = np.where(cut, result_code("diverged"), code)
    final = np.where(cut, last_slot, n_slots - 1)
    # Fill past each member's end with its last row and final parameters.
    row_source = np.minimum(rows[None, :], np.maximum(n, 1)[:, None] - 1)
    slot_source = np.where(param_rows[None, :] < n[:, None] - 1, slots, final[:, None])

    def by_row(x):
        return np.asarray(x)[members, row_source]

    def by_slot(x):
        return np.asarray(x)[members, slot_source]

    counters = work_stats(out.steps, out.accepted, out.grads, out.row_grads, out.hvps)
    t_end = np.asarray(out.ts)[members[:, 0], np.maximum(n, 1) - 1]
    all_stats = dict(counters, num_saved=n, t_end=t_end, **(stats or {}))
    all_stats.update(
        wall_time_s=timer.wall_time_s,
        compile_time_s=timer.compile_time_s,
        run_time_s=timer.run_time_s,
        compiled=timer.num_compilations > 0,
        compile_cache_hits=timer.num_cache_hits,
    )
    fields = take_fields(out, by_row, by_slot)
    if fixed is not None:
        fields.update(
            params=eqx.combine(fields["params"], fixed),
            velocity=eqx.combine(fields["velocity"], fixed),
        )
    batch = Trajectory(
        **fields,
        result=result_names(code),
        stats=all_stats,
        meta=meta,
        param_rows=param_rows,
    )
    if batched:
        return batch
    single = batch.member(0)
    single_stats = {k: v for k, v in single.stats.items() if k != "t_end"}
    single_stats.update(
        {k: v for k, v in all_stats.items() if np.ndim(v) == 0 or v is None}
    )
    return Trajectory(
        **take_fields(single, jnp.asarray, jnp.asarray),
        result=single.result,
        stats=single_stats,
        meta=meta,
        param_rows=single.param_rows,
    )
