"""The front half every entry point shares: from what the user passed (a model, data,
a time, keywords) to checked options, the trained part of the parameters, the flow,
and the engine's `Problem` and `Controls`.

`simulate`, `simulate_ensemble` and `gradient_descent` each call `prepare`; every
check of the model, the data and the options happens here, before anything is
compiled, so that a bad call fails fast with a message that names the cause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_keys, check_one_dtype, warn, warn_float64
from ._compile import use_persistent_cache
from ._engine import Controls, Problem, size_class
from ._keywords import parse
from ._linalg import hvp, power_iteration
from ._model import bind, initial_batch, initial_params, resolve_loss, split
from ._options import Options, matmul_precision_context
from ._solvers import AutoTsit5, modes, needs_hvps, solver_name
from ._tree import tree_dot
from .flows import AbstractFlow, GradientFlow
from .flows._base import describe_flow, value_and_grad


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A checked call, ready to build and run.

    Attributes:
        loss_fn: the loss as a function of the trained leaves.
        opts: the options (metrics and stop rule bound to the fixed leaves).
        params0: the trained leaves of the initial parameters (with a leading
            member axis for an ensemble).
        fixed: the leaves held fixed (functions, integers, ...), put back into the
            trajectory's parameters.
        one: the trained leaves of one member (for shapes and checks).
        members: the number of members of an ensemble; None for a single run.
        flow: the flow to integrate (None for gradient descent).
        noise: an SDE flow's keys as raw uint32 data (one per member, for an
            ensemble); else None.
        dtype: the floating-point dtype of the parameters.
        seed: the integer seed the parameters came from, if known.
        metric_shapes: the shapes of the metrics of one saved row.
    """

    loss_fn: Callable
    opts: Options
    params0: Any
    fixed: Any
    one: Any
    members: int | None
    flow: AbstractFlow | None
    noise: jax.Array | None
    dtype: Any
    seed: int | None
    metric_shapes: Any

    def meta(self, kind: str) -> dict[str, Any]:
        """How the run was made, for `Trajectory.meta`."""
        meta = dict(self.opts.meta(kind, self.dtype), seed=self.seed)
        if self.flow is not None:
            meta["flow"] = describe_flow(self.flow)
        return meta


def prepare(
    entry: str,
    model: Any,
    data: Any,
    t_max: Any,
    options: dict,
    allowed: tuple[str, ...],
    *,
    params0: Any,
    key: Any = None,
    keys: Any = None,
    batched: bool = False,
    flow: Any = None,
    noise_key: Any = None,
    flows: bool = True,
) -> Prepared:
    """Check a call of `gflow.{entry}` and prepare it (see `Prepared`).

    `batched`: an ensemble (`params0` with a leading member axis, or `keys`).
    `flows`: whether the entry point integrates a flow (not gradient descent).
    """
    use_persistent_cache()
    loss_fn = resolve_loss(model)
    opts = parse(entry, t_max, allowed, options)
    warn_float64("data", data)
    if batched:
        params, seed = initial_batch(model, params0, keys), None
    else:
        params, seed = initial_params(model, params0, key)
    params, fixed, loss_fn, opts = trained_part(loss_fn, opts, params)
    check_one_dtype(params)
    # One member's shapes (never its values: indexing would compile a program).
    one = jax.tree.map(_member_shape, params) if batched else params
    members = jax.tree.leaves(params)[0].shape[0] if batched else None
    noise = None
    if flows:
        flow, noise = prepared_flow(flow, model, fixed, one, data, noise_key, members)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    # Under the run's precision, which is part of the key of JAX's trace cache.
    with matmul_precision_context(opts.matmul_precision):
        checked_loss(loss_fn, one, data)
    metric_shapes = opts.metrics.shapes(one, data)  # a failing one is named
    if opts.solver is not None:
        opts.solver.warn_precision(dtype)
        opts = checked_solver(opts, loss_fn, flow, one, data)
    return Prepared(
        loss_fn, opts, params, fixed, one, members, flow, noise, dtype, seed,
        metric_shapes,
    )  # fmt: skip


def _member_shape(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)


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
    """Trace the loss and its gradient once abstractly, turning shape errors into
    clear ones. The trace is that of the jitted `value_and_grad`, which the run's
    program then reuses instead of tracing the loss again."""
    try:
        value, _ = eqx.filter_eval_shape(value_and_grad, loss_fn, params, data)
        return value
    except Exception as e:  # noqa: BLE001 - diagnosed on the loss alone below
        failed = e
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
    raise ValueError(
        "loss(params, data) runs, but its gradient with respect to the parameters "
        f"failed: {type(failed).__name__}: {failed}"
    ) from failed


def checked_solver(
    opts: Options, loss_fn, flow: AbstractFlow, params: Any, data: Any
) -> Options:
    """The solver options that suit `flow` and the loss.

    An SDE flow gets Euler–Maruyama (`_sde_solver`). A flow that is not a gradient
    field is refused by the stabilized solvers, and served by Tsit5 under "auto".
    Otherwise the Hessian-vector products a stabilized solver needs are checked
    (`hvp_failure`): a loss that fails them is refused with the cause. "auto" is
    checked by the run, one member's when its stabilized method is first needed
    (a flow that never stiffens needs none), an ensemble's at its start (it
    compiles both methods up front); if they fail, it runs Tsit5 and says so."""
    solver = opts.solver.solver
    if flow.is_sde:
        return _sde_solver(opts, flow)
    if flow.cost.thirds:
        _check_third_order(flow, loss_fn, params, data)
    if not needs_hvps(solver):
        return opts
    if not flow.gradient_field:
        if isinstance(solver, AutoTsit5):  # "auto" chooses for the user: Tsit5
            return _with_solver(opts, diffrax.Tsit5())
        raise ValueError(
            f"solver {solver_name(solver)!r} needs a gradient field (a symmetric "
            f"Jacobian, real eigenvalues); flow {type(flow).__name__} is not one. "
            "Use solver='tsit5' (or 'auto', which runs Tsit5 for it)."
        )
    if modes(solver) is not None:
        return opts  # checked by the run (`_run.solve`)
    failure = hvp_failure(flow, loss_fn, params, data)
    if failure is not None:
        raise _no_hvp(solver, failure) from failure
    return opts


def _check_third_order(flow: AbstractFlow, loss_fn, params: Any, data: Any) -> None:
    """Refuse, naming the cause, a loss whose third derivatives (which `flow`
    evaluates) fail: one product ∇(vᵀ H v) traced on shapes, nothing runs."""

    def third(params):
        def curvature(p):
            return tree_dot(params, hvp(loss_fn, p, data, params))

        return jax.grad(curvature)(params)

    try:
        jax.eval_shape(third, params)
    except Exception as e:  # noqa: BLE001 - re-raised naming the cause
        raise ValueError(
            f"flow {type(flow).__name__} differentiates the loss three times "
            "(Hessian-vector products and their gradients), which fails for this "
            f"loss: {type(e).__name__}: {e}. A custom derivative (jax.custom_vjp) "
            "or a host callback (jax.pure_callback) in the loss may have a first "
            "derivative and no higher ones: write that part in JAX, or give it "
            "differentiable rules."
        ) from e


def hvp_failure(flow: AbstractFlow, loss_fn, params: Any, data: Any):
    """Why the Hessian-vector products a stiff solver needs fail for this loss, or
    None: they are lowered in a power iteration as the solver runs them (some
    losses fail only there: a `jax.custom_vjp` function is refused forward-mode
    differentiation inside a loop). `params` may be shapes."""

    def top_eigenvalue(params):
        y, carried, _ = flow.init(loss_fn, params, data)
        field = flow.field(loss_fn, carried)

        def hvp(v):
            return jax.jvp(lambda z: field(0.0, z, data), (y,), (v,))[1]

        return power_iteration(hvp, y, 1)[0]

    try:
        jax.jit(top_eigenvalue).lower(params)
    except Exception as e:  # noqa: BLE001 - the cause, for the caller to report
        return e
    return None


def auto_falls_back(failure: Exception) -> None:
    """Warn that "auto" runs Tsit5 alone: its stiff steps would need
    Hessian-vector products, which fail for this loss."""
    warn(
        "solver 'auto' falls back to 'tsit5': the Hessian-vector products its "
        f"stiff steps need fail for this loss ({type(failure).__name__}). Pass "
        "solver='tsit5' to silence this warning."
    )


def _with_solver(opts: Options, solver: diffrax.AbstractSolver) -> Options:
    return eqx.tree_at(lambda o: o.solver.solver, opts, solver)


def _sde_solver(opts: Options, flow: AbstractFlow) -> Options:
    """An SDE flow runs Euler–Maruyama (Itô) at a fixed step: the default solver
    becomes diffrax's Euler at the flow's default step unless `dt0` is given."""
    solver = opts.solver
    if isinstance(solver.solver, AutoTsit5):
        dt0 = flow.default_dt0 if solver.dt0 is None else solver.dt0
        euler = type(solver)(
            diffrax.Euler(), solver.rtol, solver.atol, dt0, solver.max_steps
        )
        return eqx.tree_at(lambda o: o.solver, opts, euler)
    if type(solver.solver) is not diffrax.Euler:
        raise ValueError(
            f"flow {type(flow).__name__} is a stochastic differential equation (Itô), "
            "solved by Euler–Maruyama: `solver` must be 'euler' (with `dt0`) or "
            f"'auto' (Euler at dt0 = lr/4); got {solver_name(solver.solver)!r}."
        )
    return opts


def prepared_flow(flow, model, fixed, params, data, noise_key, members: int | None):
    """The flow ready to run (an SDE flow's `prepared`), and the noise keys of the
    members as raw uint32 keys, with a leading member axis for an ensemble (None
    for a flow without noise).
    `members` is None for `simulate` (one key), the batch size for an ensemble."""
    flow = resolve_flow(flow)
    if not flow.is_sde:
        if noise_key is not None:
            raise ValueError(
                f"`noise_key` is for flows with noise (gflow.flows.SGD); flow "
                f"{type(flow).__name__} has none."
            )
        return flow, None
    flow = flow.prepared(model, lambda fn: bind(fn, fixed), params, data)
    if noise_key is None:
        how = (
            "jax.random.key(seed)"
            if members is None
            else f"jax.random.split(key, {members}): one key per member"
        )
        raise ValueError(
            f"flow {type(flow).__name__} is stochastic: pass `noise_key=` ({how})."
        )
    return flow, jax.random.key_data(check_keys("noise_key", noise_key, members))


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


def build(
    prepared: Prepared, *, lanes: int = 1, width: int = 1
) -> tuple[Problem, Controls, int]:
    """The engine's `Problem` and `Controls` for a prepared call, and the padded
    number of parameter slots. Save times and slots are padded (`padded_saves`:
    for a single run to `FIXED_CLASS` where that fits, else to a power of two),
    so that a new number of them reuses the program. Controls are NumPy arrays:
    building them compiles nothing."""
    opts = prepared.opts
    solver, stopping, saves = opts.solver, opts.stopping, opts.saves
    problem = Problem(
        loss_fn=prepared.loss_fn,
        flow=prepared.flow,
        solver=solver.solver,
        adaptive=solver.adaptive,
        metrics=opts.metrics,
        stop_when=stopping.when,
        lanes=lanes,
        width=width,
    )
    ts, slot, n_slots = padded_saves(saves, fixed_class=fixed_class(prepared))
    dtype = np.dtype(prepared.dtype)

    def array(x):
        return None if x is None else np.asarray(x, dtype)

    controls = Controls(
        ts=ts.astype(dtype),
        n_times=np.asarray(len(saves.ts), np.int32),
        slot=slot,
        final_slot=slot[len(saves.ts) - 1],
        switch_after=np.zeros((), dtype),
        rtol=array(solver.rtol),
        atol=array(solver.atol),
        dt0=array(solver.dt0),
        stop_at_loss=array(stopping.at_loss),
        stop_at_grad_norm=array(stopping.at_grad_norm),
        max_steps=np.asarray(solver.max_steps, np.int32),
    )
    return problem, controls, n_slots


#: Up to this many save times (and kept parameter rows), a single run pads them
#: to this count, so that any number of them reuses one program; more, or rows
#: too large for `_FIXED_CLASS_BYTES`, are padded to the next power of two.
FIXED_CLASS = 1024
_FIXED_CLASS_BYTES = 64 << 20


def fixed_class(prepared: Prepared) -> tuple[bool, bool] | None:
    """Whether a single run's save rows and its parameter slots, padded to
    `FIXED_CLASS`, fit `_FIXED_CLASS_BYTES` (None for an ensemble, whose
    members' rows share its memory budget: powers of two)."""
    if prepared.members is not None:
        return None
    itemsize = np.dtype(prepared.dtype).itemsize
    row = 3 + sum(x.size for x in jax.tree.leaves(prepared.metric_shapes))
    # A slot holds the parameters and their velocity (a flow's own variables are
    # usually of the parameters' size too).
    slot = 4 * sum(x.size for x in jax.tree.leaves(prepared.one))
    return tuple(
        FIXED_CLASS * itemsize * size <= _FIXED_CLASS_BYTES for size in (row, slot)
    )


def padded_saves(
    saves, asked=None, fixed_class: tuple[bool, bool] | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The save times padded with copies of t_max and their parameter slots padded
    with an index past the last slot, both to the size class of their count (or of
    the counts `asked` for, when gradient descent merged some); and the padded
    number of slots. `fixed_class`: whether the rows and the slots may be padded
    to `FIXED_CLASS` (see `fixed_class`)."""
    asked = saves if asked is None else asked
    rows_fixed, slots_fixed = fixed_class or (False, False)

    def padded(n, fixed, smallest=1):
        return FIXED_CLASS if fixed and n <= FIXED_CLASS else size_class(n, smallest)

    n_times = len(saves.ts)
    n_slots = padded(len(asked.param_rows), slots_fixed)
    ts = np.full(padded(len(asked.ts), rows_fixed, smallest=16), saves.ts[-1])
    ts[:n_times] = saves.ts
    slot = np.full(ts.shape, n_slots, np.int32)
    slot[:n_times] = np.where(saves.params_at, saves.slots, n_slots)
    return ts, slot, n_slots


def queue(prepared: Prepared) -> tuple[Any, Any]:
    """The members to solve: (initial trained leaves, noise keys), with a leading
    member axis for an ensemble; one member's, without, for a single run."""
    return prepared.params0, prepared.noise
