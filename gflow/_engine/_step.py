"""One lane's work, as functions of one lane (a batch vmaps them): starting a
member, one step attempt (diffrax's `solver.step` and the step-size controller),
the stopping checks after it, where the loss crosses `stop_at_loss` within it, and
the values of the rows it writes."""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx

from .._compat import clip_to_end, with_controller_tolerances
from .._results import RUNNING, result_code
from .._solvers import (
    after_rejection,
    error_order,
    lands_on_saves,
    modes,
    needs_f0,
    start,
    step_cost,
)
from .._tree import tree_norm
from ..flows import FlowState
from ..flows._base import value_and_grad, velocity_is_field
from ._batch import where
from ._problem import Controls, Lane, Problem, Row, row_values

STOP_CODES = {
    "loss": result_code("stopped_at_loss"),
    "grad_norm": result_code("stopped_at_grad_norm"),
    "condition": result_code("stopped_by_condition"),
}
_SUCCESSFUL = result_code("successful")
_MAX_STEPS_REACHED = result_code("max_steps_reached")
_SOLVER_FAILED = result_code("solver_failed")
_DT_MIN_REACHED = result_code("dt_min_reached")
_DIVERGED = result_code("diverged")
_NONFINITE_START = result_code("nonfinite_start")
# Bisection alone would narrow a step to 2**-60 of its length.
_CROSSING_ITERATIONS = 60


def in_mode(problem: Problem) -> Problem:
    """The problem with the solver of its mode: for a solver of two methods
    ("auto"), the common or the rare one; else as it is."""
    split = modes(problem.solver)
    if split is None or problem.mode in (None, "both"):
        return problem
    solver = split.common if problem.mode == "common" else split.rare
    return eqx.tree_at(lambda p: p.solver, problem, solver)


def wanting_other_mode(problem: Problem, controls: Controls, lanes: Lane):
    """Which running lanes (of a batch) want the method their program does not
    step with: the program then stops, and the next one takes the other mode.

    In the common mode, a lane wants the rare method from `controls.switch_after`
    on, and only while it would still take at least `Modes.min_steps` steps at
    its present step size: compiling the rare method takes time (a second or
    more) that a run nearly done would not win back. The choice depends on the
    run's state alone, so it is the same on any machine."""
    split = modes(problem.solver)
    if split is None or problem.mode in (None, "both"):
        return jnp.zeros_like(lanes.running)
    rare = split.rare_cost(lanes.solver_state) > 0
    if problem.mode == "common":
        worth = _steps_left(controls, lanes) >= split.min_steps
        return lanes.running & rare & (lanes.t >= controls.switch_after) & worth
    return lanes.running & ~rare


def _steps_left(controls: Controls, lanes: Lane):
    """The steps each lane would still take to t_max at its present step size."""
    h = jnp.maximum(lanes.tnext - lanes.t, jnp.finfo(lanes.t.dtype).tiny)
    return (controls.ts[-1] - lanes.t) / h


def step_controller(problem: Problem, controls: Controls):
    if problem.adaptive:
        # diffrax's default norm (optimistix's RMS) over all the flow integrates.
        return diffrax.PIDController(
            rtol=controls.rtol, atol=controls.atol, norm=optx.rms_norm
        )
    return diffrax.ConstantStepSize()


def rms(tree):
    leaves = jax.tree.leaves(tree)
    size = sum(x.size for x in leaves)
    return jnp.sqrt(sum(jnp.sum(x**2) for x in leaves) / size)


def initial_step(field, t0, y0, f0, data, controls, error_order):
    """The first step size of Hairer, Nørsett & Wanner (II.4), as diffrax's
    PIDController chooses it, but reusing `f0`: one more vector field."""
    scale = jax.tree.map(lambda y: controls.atol + jnp.abs(y) * controls.rtol, y0)
    d0 = rms(jax.tree.map(jnp.divide, y0, scale))
    d1 = rms(jax.tree.map(jnp.divide, f0, scale))
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(tiny, 1e-6, 0.01 * d0 / jnp.where(tiny, 1, d1))
    f1 = field(t0 + h0, jax.tree.map(lambda y, f: y + h0 * f, y0, f0), data)
    d2 = rms(jax.tree.map(lambda a, b, s: (a - b) / s, f1, f0, scale)) / h0
    largest = jnp.maximum(d1, d2)
    h1 = jnp.where(
        largest <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / largest) ** (1 / error_order),
    )
    return jnp.minimum(100 * h0, h1)


def row_at(problem: Problem, t, y, carried, data, from_last) -> Row:
    """The values of a saved row at time `t` and state `y` (what the flow
    carries: `carried`; what the carried metrics left it: `from_last`)."""
    return row_values(
        problem.loss_fn, problem.flow, problem.metrics, t, y, carried, data, from_last
    )


# Jitted, so that its trace is made once and shared: by the shapes of the state a
# run starts from (`_entry.blank_state`) and by the program that runs it.
@eqx.filter_jit
def load(problem: Problem, controls: Controls, entry, data):
    """A lane starting a member (`entry`: its queue entry, initial parameters and
    noise key) at t = 0, and the values of its first row."""
    params0, noise = entry
    ts = controls.ts
    t0, t_max = ts[0], ts[-1]
    y0, carried, work = problem.flow.init(problem.loss_fn, params0, data)
    terms = problem.terms(controls, noise, y0, carried, data)
    field = problem.flow.field(problem.loss_fn, carried)
    order = problem.solver.error_order(terms)
    values = row_at(
        problem, t0, y0, carried, data, problem.metrics.init(y0.params, data)
    )
    evaluations = 0
    f0 = None
    if needs_f0(problem.solver) or (problem.adaptive and controls.dt0 is None):
        if velocity_is_field(y0):  # the first row's work
            f0 = FlowState(values.velocity)
        else:
            f0 = field(t0, y0, data)
            evaluations += 1
    if controls.dt0 is None and problem.adaptive:
        dt = initial_step(field, t0, y0, f0, data, controls, order)
        evaluations += 1
    else:
        dt = controls.dt0
    tnext = jnp.minimum(t0 + dt, t_max)
    controller = step_controller(problem, controls)
    _, controller_state = controller.init(
        terms, t0, t_max, y0, dt, data, problem.solver.func, order
    )
    code, loss_gap = stopped_at_start(problem, controls, values, y0, data)
    zero = jnp.zeros((), jnp.int32)
    work = work + problem.cost(evaluations, 0, carried)
    row_work = values.work  # counted with the rows' gradients
    lane = Lane(
        member=zero,
        noise=noise,
        t=t0,
        tnext=tnext,
        y=y0,
        carried=carried,
        solver_state=start(problem.solver, terms, t0, tnext, y0, data, f0),
        controller_state=controller_state,
        steps=zero,
        accepted=zero,
        grads=zero + work.grads,
        row_grads=zero + 1 + row_work.grads,
        hvps=zero + work.hvps + row_work.hvps,
        thirds=zero + work.thirds + row_work.thirds,
        row=zero + 1,
        metrics_carried=values.metrics_carried,
        last_t=t0,
        loss_gap=loss_gap,
        code=code,
        running=code == RUNNING,
        done=code != RUNNING,
        # A member that stops at t = 0 ends there: its first row is its last.
        closed=code != RUNNING,
    )
    return lane, values


def stopped_at_start(problem, controls, values: Row, y0, data):
    """The result code if a boolean stop already holds at t = 0 (the loss stop needs
    a crossing, as diffrax's events do) or the loss is undefined there, and
    loss - stop_at_loss there."""
    code = jnp.asarray(RUNNING, jnp.int32)
    gap = jnp.zeros((), values.loss.dtype)
    if controls.stop_at_loss is not None:
        gap = values.loss - controls.stop_at_loss
    if problem.stop_when is not None:
        held = condition(problem, y0, data)
        code = jnp.where(held, STOP_CODES["condition"], code)
    if controls.stop_at_grad_norm is not None:
        held = values.grad_norm <= controls.stop_at_grad_norm
        code = jnp.where(held, STOP_CODES["grad_norm"], code)
    undefined = ~jnp.isfinite(values.loss) | ~jnp.isfinite(values.grad_norm)
    return jnp.where(undefined, _NONFINITE_START, code), gap


def condition(problem, y, data):
    return jnp.asarray(problem.stop_when(y.params, data), dtype=bool)


# The fields of a lane that a step attempt changes (an ensemble writes these back
# for the lanes it steps apart).
ATTEMPT_WRITES = (
    "t", "tnext", "y", "carried", "solver_state", "controller_state", "steps",
    "accepted", "grads", "hvps", "thirds", "code",
)  # fmt: skip


def attempt(problem: Problem, controls: Controls, lane: Lane, data):
    """One step attempt of one lane: the lane after it, the step's dense output,
    whether it was accepted, and where it started."""
    t_max = controls.ts[-1]
    terms = problem.terms(controls, lane.noise, lane.y, lane.carried, data)
    controller = step_controller(problem, controls)
    solver = with_controller_tolerances(problem.solver, controller)
    y1, y_error, dense, solver_state, solver_result = solver.step(
        terms, lane.t, lane.tnext, lane.y, data, lane.solver_state, False
    )
    y_error, y_scale = _nonfinite_rejected(y1, y_error, lane.y)
    keep, tprev, tnext, _, controller_state, controller_result = (
        controller.adapt_step_size(
            lane.t,
            lane.tnext,
            lane.y,
            y_scale,
            data,
            y_error,
            error_order(solver, terms, solver_state),
            lane.controller_state,
        )
    )
    tprev = jnp.minimum(tprev, t_max)
    tnext = _next_end(solver, controls, keep, tprev, tnext, solver_state, lane)
    carried, work = _updated(problem, solver, solver_state, lane, y1, data)
    code = _attempt_code(
        solver_result, controller_result, keep, tprev, tnext, lane, t_max
    )
    new = eqx.tree_at(
        lambda s: tuple(getattr(s, name) for name in ATTEMPT_WRITES),
        lane,
        (
            tprev,
            tnext,
            where(keep, y1, lane.y),
            where(keep, carried, lane.carried),
            where(
                keep,
                solver_state,
                after_rejection(solver, lane.solver_state, solver_state),
            ),
            controller_state,
            lane.steps + 1,
            lane.accepted + keep,
            lane.grads + work.grads,
            lane.hvps + work.hvps,
            lane.thirds + work.thirds,
            code,
        ),
        is_leaf=lambda x: x is None,  # a solver or controller without state
    )
    return new, dense, keep


def _nonfinite_rejected(y1, y_error, y0):
    """The error and the state the error is scaled by. A step that produced
    inf/NaN is rejected and the next one shrunk by the controller's least factor:
    its error counts as infinite, and the error is scaled by the start alone (a
    NaN scale would make the next step NaN)."""
    if y_error is None:
        return y_error, y1
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(y1)]))
    y_error = jax.tree.map(
        lambda e: jnp.where(jnp.isnan(e) | ~finite, jnp.inf, e), y_error
    )
    return y_error, where(finite, y1, y0)


def _updated(problem: Problem, solver, solver_state, lane: Lane, y1, data):
    """What the flow carries, brought up to date at the attempt's end state
    (`AbstractFlow.update`), and the work of the attempt."""
    spent = problem.cost(*step_cost(solver, solver_state), lane.carried)
    carried, work = problem.flow.update(
        problem.loss_fn, lane.tnext, y1, lane.carried, data
    )
    return carried, spent + work


def _next_end(solver, controls: Controls, keep, tprev, tnext, solver_state, lane):
    """Where the next attempt ends: on the next save time for a solver whose
    dense output is of lower order than its steps (instead of interpolating to
    it), and clipped to t_max as diffrax clips it."""
    lands = lands_on_saves(solver, where(keep, solver_state, lane.solver_state))
    if lands is not None:
        ts = controls.ts
        following = ts[
            jnp.minimum(jnp.searchsorted(ts, tprev, side="right"), ts.shape[0] - 1)
        ]
        tnext = jnp.where(
            lands & (following > tprev), jnp.minimum(tnext, following), tnext
        )
    return clip_to_end(tprev, tnext, controls.ts[-1], keep)


def _attempt_code(solver_result, controller_result, keep, tprev, tnext, lane, t_max):
    """The code "running", or why the lane cannot go on: the solver failed on a
    step it would keep; the controller failed; or the step size has collapsed to
    the resolution of t (the next step has no length, or, after a rejected step,
    is no shorter: a shorter one rounds back to the same times). That last is how
    a flow that blows up in finite time ends, at the time it blows up:
    "diverged"."""
    failed = (solver_result != diffrax.RESULTS.successful) & keep
    no_shorter = ~keep & (tnext - tprev >= lane.tnext - lane.t)
    stuck = (no_shorter | (tnext <= tprev)) & (tprev < t_max)
    return jnp.select(
        [failed, controller_result != diffrax.RESULTS.successful, stuck],
        [_SOLVER_FAILED, _DT_MIN_REACHED, _DIVERGED],
        RUNNING,
    )


def outcome(controls: Controls, before: Lane, stepped: Lane, accepted, stops):
    """The lane after a step attempt: its result code ("running" while it goes on)
    and whether it is done (a stop held, t_max reached, a failure, or its
    `max_steps` spent)."""
    ended = stops != RUNNING
    finished = accepted & (stepped.t >= controls.ts[-1])
    over = stepped.running & (stepped.steps >= controls.max_steps)
    failed = stepped.code != RUNNING
    code = jnp.select(
        [ended, failed, finished, over],
        [stops, stepped.code, _SUCCESSFUL, _MAX_STEPS_REACHED],
        RUNNING,
    )
    # A lane that was not running keeps its flag (a fresh state's lanes are done
    # until the refill records them).
    done = before.done | (before.running & (ended | finished | over | failed))
    return eqx.tree_at(
        lambda s: (s.code, s.running, s.done),
        stepped,
        (code, before.running & ~done, done),
    )


def checks(
    problem: Problem, controls: Controls, before: Lane, stepped: Lane, accepted, data
):
    """The stopping checks after a step (only those the run asks for): the lane
    with its loss gap and counters updated, the stop code that holds, and whether
    the loss crossed `stop_at_loss` within the step."""
    gap, held, extra = events(problem, controls, stepped, data)
    stepped = eqx.tree_at(
        lambda s: (s.row_grads, s.loss_gap),
        stepped,
        (
            stepped.row_grads + extra * before.running,
            jnp.where(accepted, gap, stepped.loss_gap),
        ),
    )
    stops = jnp.where(accepted, held, RUNNING)
    crossed = jnp.zeros((), bool)
    if controls.stop_at_loss is not None:
        crossed = accepted & (before.loss_gap > 0) & (gap <= 0)
        stops = jnp.where(crossed, STOP_CODES["loss"], stops)
    return stepped, stops, crossed


def asks_for_checks(problem: Problem, controls: Controls) -> bool:
    """Whether the run asks for a stop (then `checks` runs after every step)."""
    return (
        controls.stop_at_loss is not None
        or controls.stop_at_grad_norm is not None
        or problem.stop_when is not None
    )


def row_due(controls: Controls, lane: Lane, accepted, limit):
    """Whether a lane's next save row lies within its last step: times in
    (t0, limit], or (t0, limit) for a lane that is done (its last row, at the time
    it ended, is written apart)."""
    row = jnp.minimum(lane.row, controls.ts.shape[0] - 1)
    t = controls.ts[row]
    due = jnp.where(lane.done, t < limit, t <= limit)
    return accepted & (lane.row < controls.n_times) & due


def next_row(
    problem: Problem, controls: Controls, lane: Lane, start, dense, limit, regular, data
):
    """The next row a lane writes: a save row within its last step (`regular`),
    else its last row, at `limit` (where it ended), replacing a row written at
    that time. Values come from the step's dense output and what the flow carried
    into the step (`start`: the step's first time and that), as the step's own
    evaluations did. Returns (row, time, slot, values)."""
    t0, carried = start
    t = jnp.where(
        regular, controls.ts[jnp.minimum(lane.row, controls.ts.shape[0] - 1)], limit
    )
    replace = ~regular & (lane.row > 0) & (lane.last_t >= t)
    row = jnp.where(replace, lane.row - 1, lane.row)
    slot = jnp.where(regular, controls.slot[row], controls.final_slot)
    interpolation = problem.solver.interpolation_cls(t0=t0, t1=lane.t, **dense)
    y = interpolation.evaluate(t)
    return row, t, slot, row_at(problem, t, y, carried, data, lane.metrics_carried)


def wrote_row(problem: Problem, lane: Lane, row, t, regular, values: Row) -> Lane:
    """The lane after writing `row` (`values`) at time `t` (its last row unless
    `regular`)."""
    work = values.work
    return eqx.tree_at(
        lambda s: (
            s.row,
            s.last_t,
            s.row_grads,
            s.hvps,
            s.thirds,
            s.closed,
            s.metrics_carried,
        ),
        lane,
        (
            row + 1,
            t,
            lane.row_grads + 1 + work.grads,
            lane.hvps + work.hvps,
            lane.thirds + work.thirds,
            lane.closed | ~regular,
            values.metrics_carried,
        ),
    )


def events(problem: Problem, controls: Controls, lane: Lane, data):
    """After a step: loss - stop_at_loss, and which boolean stop holds (a code)."""
    params = lane.y.params
    code = jnp.asarray(RUNNING, jnp.int32)
    gap = lane.loss_gap
    extra = 0
    if controls.stop_at_grad_norm is not None:
        loss, grad = value_and_grad(problem.loss_fn, params, data)
        extra = 1
        held = tree_norm(grad) <= controls.stop_at_grad_norm
        code = jnp.where(held, STOP_CODES["grad_norm"], code)
    elif controls.stop_at_loss is not None:
        loss = problem.loss_fn(params, data)
    if controls.stop_at_loss is not None:
        gap = loss - controls.stop_at_loss
    if problem.stop_when is not None:
        code = jnp.where(
            condition(problem, lane.y, data), STOP_CODES["condition"], code
        )
    return gap, code, extra


def locate_loss_crossing(problem, controls, t0, t1, dense, data):
    """Where the loss falls to `stop_at_loss` within a step, and the state there.

    Newton's method on the dense output, started from `t1` as diffrax starts its
    event root finds, kept inside the bracket: the loss is above the threshold at
    `t0` and not above it at `t1`, and a Newton step that would leave the bracket
    (or is not finite) bisects it instead.
    """
    interpolation = problem.solver.interpolation_cls(t0=t0, t1=t1, **dense)

    def gap(t):
        params = interpolation.evaluate(t).params
        return problem.loss_fn(params, data) - controls.stop_at_loss

    tol = 1e-10 if t1.dtype == jnp.float64 else 1e-5

    def improve(carry):
        low, high, t, _, count = carry
        value, slope = jax.jvp(gap, (t,), (jnp.ones_like(t),))
        low, high = jnp.where(value > 0, t, low), jnp.where(value > 0, high, t)
        newton = t - value / slope
        inside = (newton > low) & (newton < high)  # False if not finite
        new = jnp.where(value == 0, t, jnp.where(inside, newton, (low + high) / 2))
        return low, high, new, jnp.abs(new - t), count + 1

    def going(carry):
        *_, t, change, count = carry
        return (change > tol * (1 + jnp.abs(t))) & (count < _CROSSING_ITERATIONS)

    start = (t0, t1, t1, jnp.asarray(jnp.inf, t1.dtype), 0)
    root = jax.lax.while_loop(going, improve, start)[2]
    return root, interpolation.evaluate(root)
