"""The engine: lanes of solver state, one compiled `lax.while_loop` over steps.

Every flow gflow solves runs here, built on diffrax's step API: `solver.step`, the
controller's `adapt_step_size`, and `solver.interpolation_cls` for the save times.
A lane holds one member's solve: its time, state, step size, solver and controller
states, counters and save cursor. Each iteration every running lane attempts one
step (vmapped); then, a few lanes at a time (`width`), the lanes that crossed save
times write those rows, lanes whose loss fell through `stop_at_loss` locate the
crossing, and lanes whose member is done write its results and take the next
member from the queue. `simulate` is one lane and one member; `simulate_ensemble`
is many lanes refilled from a queue until it drains, with no trip to the host.

Outputs are indexed by member: row times, loss, gradient norm and metrics at every
row; parameters and velocities only in the rows' parameter slots (`slot`), the last
slot being each member's final state; counters and the result code.

The loop stops after `budget` iterations; its whole carry (`State`) can be handed
back in to go on, which is how checkpointed runs are segmented.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from diffrax._root_finder import use_stepsize_tol

from ._options import Metrics
from ._outcome import result_code
from ._solvers import (
    after_rejection,
    by_mode,
    error_order,
    lands_on_saves,
    needs_f0,
    start,
    step_cost,
)
from ._tree import tree_norm
from .flows import AbstractFlow

_STOP_CODES = {
    "loss": result_code("stopped_at_loss"),
    "grad_norm": result_code("stopped_at_grad_norm"),
    "condition": result_code("stopped_by_condition"),
}
_RUNNING = result_code("successful")
_MAX_ITERATIONS = jnp.iinfo(jnp.int32).max
# Bisection alone would narrow a step to 2**-60 of its length.
_CROSSING_ITERATIONS = 60


class Problem(eqx.Module):
    """What is solved. Everything here is part of the compiled program's identity
    (changing it recompiles); numbers that change from run to run are `Controls`."""

    loss_fn: Callable
    flow: AbstractFlow
    solver: diffrax.AbstractSolver
    adaptive: bool = eqx.field(static=True)
    metrics: Metrics
    stop_when: Callable | None
    lanes: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    progress: bool = eqx.field(static=True)

    def terms(self, controls: Controls, noise, y, data):
        """The equation's terms; an SDE flow's Brownian motion is a virtual
        Brownian tree drawn from the lane's key `noise`, resolved to dt0 / 2."""
        if not self.flow.is_sde:
            return self.flow.terms(self.loss_fn)
        path = diffrax.VirtualBrownianTree(
            controls.ts[0], controls.ts[-1], tol=controls.dt0 / 2,
            shape=self.flow.noise_shape(self.flow.params(y), data),
            key=jax.random.wrap_key_data(noise),
        )  # fmt: skip
        return self.flow.terms(self.loss_fn, path)

    def cost(self, evaluations, solver_hvps):
        """(gradients, Hessian-vector products) of `evaluations` of the terms,
        with the solver's own Hessian-vector products."""
        grads, hvps = self.flow.cost
        counted = jnp.asarray(evaluations) >= 0  # implicit solvers: -1, not counted
        return (
            jnp.where(counted, evaluations * grads, evaluations),
            jnp.where(counted, evaluations * hvps + solver_hvps, solver_hvps),
        )


class Controls(eqx.Module):
    """The numbers of a run: arrays, so new values reuse the compiled program."""

    ts: jax.Array  # (T,) save times
    slot: jax.Array  # (T,) int32: the parameter slot of each save row; R if none
    rtol: jax.Array
    atol: jax.Array
    dt0: jax.Array | None
    stop_at_loss: jax.Array | None
    stop_at_grad_norm: jax.Array | None
    max_steps: jax.Array


class Lane(eqx.Module):
    """One member's solve in progress (every field has a leading lane axis)."""

    member: jax.Array  # the member it holds; M when none
    noise: Any  # an SDE flow's key (raw uint32), None otherwise
    t: jax.Array  # time reached (last accepted step)
    tnext: jax.Array  # end of the next step attempt
    y: Any
    solver_state: Any
    controller_state: Any
    steps: jax.Array
    accepted: jax.Array
    grads: jax.Array  # gradients spent stepping (initial step included)
    row_grads: jax.Array  # gradients spent on saved rows and stopping checks
    hvps: jax.Array
    row: jax.Array  # the next row to write
    last_t: jax.Array  # the time of the last row written
    loss_gap: jax.Array  # loss - stop_at_loss at t
    code: jax.Array  # RESULTS code once done; successful while running
    running: jax.Array
    done: jax.Array  # finished: to be recorded, then refilled


class Outputs(eqx.Module):
    """What the members produced, indexed by member."""

    ts: jax.Array  # (M, T)
    loss: jax.Array
    grad_norm: jax.Array
    metrics: Any
    params: Any  # (M, R, ...)
    velocity: Any
    n_rows: jax.Array  # (M,)
    code: jax.Array
    steps: jax.Array
    accepted: jax.Array
    grads: jax.Array
    row_grads: jax.Array
    hvps: jax.Array


class State(eqx.Module):
    """The loop's carry: everything needed to go on."""

    lanes: Lane
    out: Outputs
    next_member: jax.Array
    iterations: jax.Array
    # While members are still queued: iterations, and lane-steps of running lanes.
    queued_iterations: jax.Array
    queued_busy: jax.Array


def _take(tree, index):
    return jax.tree.map(lambda x: x[index] if eqx.is_array(x) else x, tree)


def _put(tree, index, values):
    """`tree[index] = values` for every array leaf; out-of-range indices dropped."""
    return jax.tree.map(
        lambda x, v: x.at[index].set(v, mode="drop") if eqx.is_array(x) else x,
        tree,
        values,
    )


def _where(pred, a, b):
    """Per lane: `a` where `pred`, else `b`. (A Python scalar in a lane's state,
    such as diffrax's PID `at_dtmin` flag, becomes an array where the other is.)"""

    pred = jnp.asarray(pred)

    def pick(x, y):
        if not (eqx.is_array(x) or eqx.is_array(y)):
            return x
        x, y = jnp.asarray(x), jnp.asarray(y)
        ndim = max(x.ndim, y.ndim)
        return jnp.where(pred.reshape(pred.shape + (1,) * (ndim - pred.ndim)), x, y)

    return jax.tree.map(pick, a, b)


def _per_lane(fn: Callable, width: int) -> Callable:
    """`fn` of one lane, applied to `width` lanes (leading axis of every array).

    One lane is not vmapped, so that the solver's `lax.cond`s (e.g. whether to
    estimate the spectral radius, which method "auto" takes) stay branches instead
    of becoming selects that evaluate both sides.
    """
    if width > 1:
        return eqx.filter_vmap(fn)

    def one(*args):
        out = fn(*jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, args))
        return jax.tree.map(lambda x: x[None] if eqx.is_array(x) else x, out)

    return one


def _if_any(mask, fn, *args):
    """`fn(*args)` if any of `mask` holds, else zeros like it: work for a batch of
    lanes is skipped when none of them needs it."""

    def skip(*args):
        return _zeros(eqx.filter_eval_shape(fn, *args))

    return jax.lax.cond(jnp.any(mask), lambda *a: fn(*a), skip, *args)


def _select(mask, width):
    """Up to `width` lane indices where `mask` holds; the rest point past the end."""
    return jnp.nonzero(mask, size=width, fill_value=mask.shape[0])[0]


def _for_some(pending: Callable, work: Callable, carry, width: int):
    """Apply `work(carry, lanes)` to the lanes where `pending(carry)`, `width` at a
    time, until none is pending. `work` must make progress on the lanes it gets."""

    def body(carry):
        return work(carry, _select(pending(carry), width))

    return jax.lax.while_loop(lambda c: jnp.any(pending(c)), body, carry)


def _controller(problem: Problem, controls: Controls):
    if problem.adaptive:
        return diffrax.PIDController(rtol=controls.rtol, atol=controls.atol)
    return diffrax.ConstantStepSize()


def _solver(problem: Problem, controller):
    """The solver; an implicit one gets the controller's tolerances for its Newton
    iterations where it asks for them, as `diffeqsolve` gives them."""
    solver = problem.solver
    if not (isinstance(solver, diffrax.AbstractImplicitSolver) and problem.adaptive):
        return solver
    names = [
        name
        for name in ("rtol", "atol", "norm")
        if getattr(solver.root_finder, name) is use_stepsize_tol
    ]
    return eqx.tree_at(
        lambda s: [getattr(s.root_finder, name) for name in names],
        solver,
        [getattr(controller, name) for name in names],
    )


def _rms(tree):
    leaves = jax.tree.leaves(tree)
    size = sum(x.size for x in leaves)
    return jnp.sqrt(sum(jnp.sum(x**2) for x in leaves) / size)


def _initial_step(field, t0, y0, f0, data, controls, error_order):
    """The first step size of Hairer, Nørsett & Wanner (II.4), as diffrax's
    PIDController chooses it, but reusing `f0`: one more vector field."""
    scale = jax.tree.map(lambda y: controls.atol + jnp.abs(y) * controls.rtol, y0)
    d0 = _rms(jax.tree.map(jnp.divide, y0, scale))
    d1 = _rms(jax.tree.map(jnp.divide, f0, scale))
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(tiny, 1e-6, 0.01 * d0 / jnp.where(tiny, 1, d1))
    f1 = field(t0 + h0, jax.tree.map(lambda y, f: y + h0 * f, y0, f0), data)
    d2 = _rms(jax.tree.map(lambda a, b, s: (a - b) / s, f1, f0, scale)) / h0
    largest = jnp.maximum(d1, d2)
    h1 = jnp.where(
        largest <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / largest) ** (1 / error_order),
    )
    return jnp.minimum(100 * h0, h1)


def _clip_to_end(tprev, tnext, t1, keep_step):
    # As diffrax: a step ending within ~100 ulp of t1 ends at t1, so no sliver of a
    # step (with an ill-conditioned dense output) is left.
    clipped = jnp.where(keep_step, t1, tprev + 0.5 * (t1 - tprev))
    return jnp.where(tnext > _ulps_below(t1, 100), clipped, tnext)


def _ulps_below(t, n):
    """`n` steps of `nextafter` from `t` > 0 towards 0, as one subtraction on its
    bits (a positive float's bits count its representable predecessors)."""
    bits = jax.lax.bitcast_convert_type(t, jnp.dtype(f"int{8 * t.dtype.itemsize}"))
    return jax.lax.bitcast_convert_type(jnp.maximum(bits - n, 0), t.dtype)


class _Row(eqx.Module):
    """The values saved in one row."""

    loss: jax.Array
    grad_norm: jax.Array
    metrics: Any
    params: Any
    velocity: Any


def row_values(loss_fn, flow: AbstractFlow, metrics: Metrics, y, data) -> _Row:
    """What a saved row holds for state `y`: one gradient evaluation."""
    params = flow.params(y)
    loss, grad = jax.value_and_grad(loss_fn)(params, data)
    return _Row(
        loss=loss,
        grad_norm=tree_norm(grad),
        metrics=metrics(params, data),
        params=params,
        velocity=flow.velocity(loss_fn, y, data, grad),
    )


def _row(problem: Problem, y, data) -> _Row:
    return row_values(problem.loss_fn, problem.flow, problem.metrics, y, data)


def _write(out: Outputs, member, row, t, values: _Row, slot) -> Outputs:
    """Write rows `row` of members `member` (indices past the end are dropped) and
    their parameters into `slot`."""
    at = (member, row)
    return eqx.tree_at(
        lambda o: (o.ts, o.loss, o.grad_norm, o.metrics, o.params, o.velocity),
        out,
        (
            out.ts.at[at].set(t, mode="drop"),
            out.loss.at[at].set(values.loss, mode="drop"),
            out.grad_norm.at[at].set(values.grad_norm, mode="drop"),
            _put_at(out.metrics, at, values.metrics),
            _put_at(out.params, (member, slot), values.params),
            _put_at(out.velocity, (member, slot), values.velocity),
        ),
    )


def _put_at(tree, at, values):
    return jax.tree.map(lambda x, v: x.at[at].set(v, mode="drop"), tree, values)


def _load(problem: Problem, controls: Controls, entry, data):
    """A lane starting a member (`entry`: its queue entry, initial parameters and
    noise key) at t = 0, and the values of its first row."""
    params0, noise = entry
    ts = controls.ts
    t0, t_max = ts[0], ts[-1]
    y0 = problem.flow.initial_state(problem.loss_fn, params0, data)
    terms = problem.terms(controls, noise, y0, data)
    field = problem.flow.vector_field(problem.loss_fn)
    error_order = problem.solver.error_order(terms)
    grads = 0
    f0 = None
    if needs_f0(problem.solver) or (problem.adaptive and controls.dt0 is None):
        f0 = field(t0, y0, data)
        grads += 1
    if controls.dt0 is None and problem.adaptive:
        dt = _initial_step(field, t0, y0, f0, data, controls, error_order)
        grads += 1
    else:
        dt = controls.dt0
    tnext = jnp.minimum(t0 + dt, t_max)
    controller = _controller(problem, controls)
    _, controller_state = controller.init(
        terms, t0, t_max, y0, dt, data, problem.solver.func, error_order
    )
    values = _row(problem, y0, data)
    code, loss_gap = _stopped_at_start(problem, controls, values, y0, data)
    zero = jnp.zeros((), jnp.int32)
    grads, hvps = problem.cost(grads, 0)
    grads += problem.flow.start_grads
    lane = Lane(
        member=zero,
        noise=noise,
        t=t0,
        tnext=tnext,
        y=y0,
        solver_state=start(problem.solver, terms, t0, tnext, y0, data, f0),
        controller_state=controller_state,
        steps=zero,
        accepted=zero,
        grads=zero + grads,
        row_grads=zero + 1,
        hvps=zero + hvps + problem.flow.row_hvps,  # the first row's velocity
        row=zero + 1,
        last_t=t0,
        loss_gap=loss_gap,
        code=code,
        running=code == _RUNNING,
        done=code != _RUNNING,
    )
    return lane, values


def _stopped_at_start(problem, controls, values: _Row, y0, data):
    """The result code if a boolean stop already holds at t = 0 (the loss stop needs
    a crossing, as diffrax's events do), and loss - stop_at_loss there."""
    code = jnp.asarray(_RUNNING, jnp.int32)
    gap = jnp.zeros((), values.loss.dtype)
    if controls.stop_at_loss is not None:
        gap = values.loss - controls.stop_at_loss
    if problem.stop_when is not None:
        held = _condition(problem, y0, data)
        code = jnp.where(held, _STOP_CODES["condition"], code)
    if controls.stop_at_grad_norm is not None:
        held = values.grad_norm <= controls.stop_at_grad_norm
        code = jnp.where(held, _STOP_CODES["grad_norm"], code)
    return code, gap


def _condition(problem, y, data):
    return jnp.asarray(problem.stop_when(problem.flow.params(y), data), dtype=bool)


def _attempt(problem: Problem, controls: Controls, lane: Lane, data):
    """One step attempt of one lane: the lane after it, the step's dense output,
    whether it was accepted, and where it started."""
    t_max = controls.ts[-1]
    terms = problem.terms(controls, lane.noise, lane.y, data)
    controller = _controller(problem, controls)
    solver = _solver(problem, controller)
    y1, y_error, dense, solver_state, solver_result = solver.step(
        terms, lane.t, lane.tnext, lane.y, data, lane.solver_state, False
    )
    if y_error is not None:
        y_error = jax.tree.map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), y_error)
    keep, tprev, tnext, _, controller_state, controller_result = (
        controller.adapt_step_size(
            lane.t, lane.tnext, lane.y, y1, data, y_error,
            error_order(solver, terms, solver_state), lane.controller_state,
        )
    )  # fmt: skip
    tprev = jnp.minimum(tprev, t_max)
    lands = lands_on_saves(solver, _where(keep, solver_state, lane.solver_state))
    if lands is not None:
        # Its dense output is of lower order than its steps: end the steps on the
        # save times instead of interpolating to them.
        ts = controls.ts
        following = ts[jnp.minimum(jnp.searchsorted(ts, tprev, side="right"),
                                   ts.shape[0] - 1)]  # fmt: skip
        tnext = jnp.where(lands & (following > tprev), jnp.minimum(tnext, following),
                          tnext)  # fmt: skip
    tnext = _clip_to_end(tprev, tnext, t_max, keep)
    grads, hvps = problem.cost(*step_cost(solver, solver_state))
    failed = (solver_result != diffrax.RESULTS.successful) & keep
    collapsed = tnext <= tprev  # the step size is below the resolution of t
    code = jnp.where(
        failed,
        result_code("solver_failed"),
        jnp.where(
            (controller_result != diffrax.RESULTS.successful) | (collapsed & ~keep),
            result_code("dt_min_reached"),
            _RUNNING,
        ),
    )
    new = eqx.tree_at(
        lambda s: (s.t, s.tnext, s.y, s.solver_state, s.controller_state, s.steps,
                   s.accepted, s.grads, s.hvps, s.code),
        lane,
        (
            tprev,
            tnext,
            _where(keep, y1, lane.y),
            _where(keep, solver_state,
                   after_rejection(solver, lane.solver_state, solver_state)),
            controller_state,
            lane.steps + 1,
            lane.accepted + keep,
            lane.grads + grads,
            lane.hvps + hvps,
            code,
        ),
        is_leaf=lambda x: x is None,  # a solver or controller without state
    )  # fmt: skip
    return new, dense, keep


def _events(problem: Problem, controls: Controls, lane: Lane, data):
    """After a step: loss - stop_at_loss, and which boolean stop holds (a code)."""
    params = problem.flow.params(lane.y)
    code = jnp.asarray(_RUNNING, jnp.int32)
    gap = lane.loss_gap
    extra = 0
    if controls.stop_at_grad_norm is not None:
        loss, grad = jax.value_and_grad(problem.loss_fn)(params, data)
        extra = 1
        held = tree_norm(grad) <= controls.stop_at_grad_norm
        code = jnp.where(held, _STOP_CODES["grad_norm"], code)
    elif controls.stop_at_loss is not None:
        loss = problem.loss_fn(params, data)
    if controls.stop_at_loss is not None:
        gap = loss - controls.stop_at_loss
    if problem.stop_when is not None:
        code = jnp.where(
            _condition(problem, lane.y, data), _STOP_CODES["condition"], code
        )
    return gap, code, extra


def _loss_crossing(problem, controls, t0, t1, dense, data):
    """Where the loss falls to `stop_at_loss` within a step, and the state there.

    Newton's method on the dense output, started from `t1` as diffrax starts its
    event root finds, kept inside the bracket: the loss is above the threshold at
    `t0` and not above it at `t1`, and a Newton step that would leave the bracket
    (or is not finite) bisects it instead.
    """
    interpolation = problem.solver.interpolation_cls(t0=t0, t1=t1, **dense)

    def gap(t):
        params = problem.flow.params(interpolation.evaluate(t))
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


def _step_all(problem: Problem, controls: Controls, queue, state: State, data):
    """One iteration: every running lane attempts a step; rows, stops, finished
    members and refills follow, a few lanes at a time."""
    lanes, out = state.lanes, state.out
    t_before = lanes.t
    stepped, dense, accepted = _attempt_all(problem, controls, lanes, data)
    stepped = _where(lanes.running, stepped, lanes)
    accepted &= lanes.running
    t_end = stepped.t
    stops = _RUNNING * jnp.ones_like(lanes.code)
    y_end = stepped.y
    if (
        controls.stop_at_loss is not None
        or controls.stop_at_grad_norm is not None
        or (problem.stop_when is not None)
    ):
        events = _per_lane(
            lambda lane: _events(problem, controls, lane, data), problem.lanes
        )
        gap, held, extra = events(stepped)
        stepped = eqx.tree_at(
            lambda s: (s.row_grads, s.loss_gap),
            stepped,
            (stepped.row_grads + extra * lanes.running,
             jnp.where(accepted, gap, stepped.loss_gap)),
        )  # fmt: skip
        stops = jnp.where(accepted, held, stops)
        if controls.stop_at_loss is not None:
            crossed = accepted & (lanes.loss_gap > 0) & (gap <= 0)
            stops = jnp.where(crossed, _STOP_CODES["loss"], stops)
            t_end, y_end = _locate_crossings(
                problem, controls, crossed, t_before, stepped.t, dense, t_end, y_end,
                data,
            )  # fmt: skip
    ended = stops != _RUNNING
    finished = accepted & (stepped.t >= controls.ts[-1])
    over = stepped.running & (stepped.steps >= controls.max_steps)
    failed = stepped.code != _RUNNING
    code = jnp.where(
        ended,
        stops,
        jnp.where(
            failed,
            stepped.code,
            jnp.where(finished | ~over, _RUNNING, result_code("max_steps_reached")),
        ),
    )
    done = lanes.running & (ended | finished | over | failed)
    stepped = eqx.tree_at(
        lambda s: (s.code, s.running, s.done), stepped, (code, lanes.running & ~done,
                                                          done)
    )  # fmt: skip
    # Rows crossed by this step: up to where it ends; a member that is done writes
    # its last row (at t_end) when it is recorded.
    limit = jnp.where(done, t_end, stepped.t)
    state = _write_crossed_rows(
        problem, controls, eqx.tree_at(lambda s: s.lanes, state, stepped), accepted,
        t_before, limit, done, dense, data,
    )  # fmt: skip
    queued = state.next_member < out.n_rows.size
    busy = jnp.sum(lanes.running, dtype=jnp.int32)
    state = _finish_and_refill(problem, controls, queue, state, t_end, y_end, data)
    return eqx.tree_at(
        lambda s: (s.iterations, s.queued_iterations, s.queued_busy),
        state,
        (state.iterations + 1, state.queued_iterations + queued,
         state.queued_busy + jnp.where(queued, busy, 0)),
    )  # fmt: skip


def _attempt_all(problem: Problem, controls: Controls, lanes: Lane, data):
    """Every lane's step attempt (`_attempt`, vmapped).

    A solver whose steps take one of two methods ("auto") would, under vmap, take
    both on every lane whenever its lanes are in both modes. Instead every lane
    steps in the common mode, and then the lanes in the rare mode step again in
    theirs, gathered `width` at a time: each lane's step is the one it takes alone,
    and the rare method costs only what its lanes need. They are gathered costliest
    first (a stabilized step's stage count varies from lane to lane, and a batch
    runs as many stages as its costliest lane), so lanes of like cost share one.
    """

    def attempt(solver, width):
        one = eqx.tree_at(lambda p: p.solver, problem, solver)
        return _per_lane(lambda lane: _attempt(one, controls, lane, data), width)

    modes = by_mode(problem.solver) if problem.lanes > 1 else None
    if modes is None:
        return attempt(problem.solver, problem.lanes)(lanes)
    common, rare, rare_cost = modes
    attempt_rare = attempt(rare, problem.width)
    cost = jnp.where(lanes.running, rare_cost(lanes.solver_state), 0)
    order = jnp.argsort(-cost)  # positions in this order: the rare lanes first

    def work(carry, position):
        todo, result = carry
        lane = order[jnp.minimum(position, problem.lanes - 1)]
        target = jnp.where(position < problem.lanes, lane, problem.lanes)
        return (todo.at[position].set(False, mode="drop"),
                _put(result, target, attempt_rare(_take(lanes, lane))))  # fmt: skip

    result = attempt(common, problem.lanes)(lanes)
    return _for_some(lambda c: c[0], work, (cost[order] > 0, result),
                     problem.width)[1]  # fmt: skip


def _locate_crossings(problem, controls, crossed, t0, t1, dense, t_end, y_end, data):
    """t_end and y_end at the loss crossing of the lanes that crossed."""

    def pending(carry):
        return carry[0]

    def work(carry, index):
        todo, t_end, y_end = carry
        lane = jnp.minimum(index, todo.shape[0] - 1)
        locate = _per_lane(
            lambda a, b, d: _loss_crossing(problem, controls, a, b, d, data),
            problem.width,
        )
        root, y = locate(t0[lane], t1[lane], _take(dense, lane))
        return (
            todo.at[index].set(False, mode="drop"),
            t_end.at[index].set(root, mode="drop"),
            _put(y_end, index, y),
        )

    _, t_end, y_end = _for_some(pending, work, (crossed, t_end, y_end),
                                problem.width)  # fmt: skip
    return t_end, y_end


def _write_crossed_rows(problem, controls, state, accepted, t0, limit, done, dense,
                        data):  # fmt: skip
    """Write every save row that the lanes' accepted steps crossed: times in
    (t0, limit], or (t0, limit) for lanes that are done (their last row comes at
    the end). Values come from the solver's dense output."""
    ts = controls.ts
    n_times = ts.shape[0]

    def pending(state):
        lanes = state.lanes
        row = jnp.minimum(lanes.row, n_times - 1)
        due = jnp.where(done, ts[row] < limit, ts[row] <= limit)
        return accepted & (lanes.row < n_times) & due

    def work(state, index):
        lanes, out = state.lanes, state.out
        lane = jnp.minimum(index, problem.lanes - 1)
        row = lanes.row[lane]
        t = ts[row]

        def values(a, b, d, t):
            interpolation = problem.solver.interpolation_cls(t0=a, t1=b, **d)
            return _row(problem, interpolation.evaluate(t), data)

        new_values = _per_lane(values, problem.width)(
            t0[lane], lanes.t[lane], _take(dense, lane), t
        )
        member = jnp.where(index < problem.lanes, lanes.member[lane], out.n_rows.size)
        out = _write(out, member, row, t, new_values, controls.slot[row])
        lanes = eqx.tree_at(
            lambda s: (s.row, s.last_t, s.row_grads, s.hvps),
            lanes,
            (
                lanes.row.at[index].add(1, mode="drop"),
                lanes.last_t.at[index].set(t, mode="drop"),
                lanes.row_grads.at[index].add(1, mode="drop"),
                lanes.hvps.at[index].add(problem.flow.row_hvps, mode="drop"),
            ),
        )
        return eqx.tree_at(lambda s: (s.lanes, s.out), state, (lanes, out))

    return _for_some(pending, work, state, problem.width)


def _finish_and_refill(problem, controls, queue, state, t_end, y_end, data):
    """Record every finished member (its last row, its counters and result) and
    give its lane the next member of the queue, until no lane is done."""
    n_members = state.out.n_rows.size
    final_slot = jax.tree.leaves(state.out.params)[0].shape[1] - 1

    def pending(carry):
        return carry[0].lanes.done

    def work(carry, index):
        state, t_end, y_end = carry
        lanes, out = state.lanes, state.out
        real = index < problem.lanes
        lane = jnp.minimum(index, problem.lanes - 1)
        picked = _take(lanes, lane)
        # The last row: at t_end, replacing the last written row if at the same time.
        t_last = t_end[lane]
        row = jnp.where(
            (picked.row > 0) & (picked.last_t >= t_last), picked.row - 1, picked.row
        )
        has_member = real & (picked.member < n_members)
        member = jnp.where(has_member, picked.member, n_members)
        values = _if_any(
            has_member,
            _per_lane(lambda y: _row(problem, y, data), problem.width),
            _take(y_end, lane),
        )
        out = _write(out, member, row, t_last, values, final_slot)
        counters = dict(
            n_rows=row + 1, code=picked.code, steps=picked.steps,
            accepted=picked.accepted, grads=picked.grads,
            row_grads=picked.row_grads + 1,
            hvps=picked.hvps + problem.flow.row_hvps,
        )  # fmt: skip
        out = eqx.tree_at(
            lambda o: tuple(getattr(o, k) for k in counters),
            out,
            tuple(getattr(out, k).at[member].set(v, mode="drop")
                  for k, v in counters.items()),
        )  # fmt: skip
        # The next members of the queue go to these lanes, in lane order.
        queued = state.next_member + jnp.cumsum(real, dtype=jnp.int32) - 1
        takes = real & (queued < n_members)
        members = jnp.where(takes, queued, n_members)
        new_lanes, first_rows = _if_any(
            takes,
            _per_lane(lambda p: _load(problem, controls, p, data), problem.width),
            _take(queue, jnp.minimum(members, n_members - 1)),
        )
        new_lanes = eqx.tree_at(lambda s: s.member, new_lanes, members)
        idle = eqx.tree_at(
            lambda s: (s.member, s.running, s.done),
            picked,
            (jnp.full_like(picked.member, n_members),
             jnp.zeros_like(picked.running), jnp.zeros_like(picked.done)),
        )  # fmt: skip
        lanes = _put(lanes, index, _where(takes, new_lanes, idle))
        out = _write(out, members, jnp.zeros_like(members), controls.ts[0],
                     first_rows, controls.slot[0])  # fmt: skip
        # A member that is done at t = 0 ends there: its lane is recorded next round.
        t_end = t_end.at[index].set(controls.ts[0], mode="drop")
        y_end = _put(y_end, index, _where(takes, new_lanes.y, _take(y_end, lane)))
        state = eqx.tree_at(
            lambda s: (s.lanes, s.out, s.next_member),
            state,
            (lanes, out, state.next_member + jnp.sum(takes, dtype=jnp.int32)),
        )
        return state, t_end, y_end

    state, _, _ = _for_some(pending, work, (state, t_end, y_end), problem.width)
    return state


def _zeros(struct, lead=()):
    """Zeros shaped like `struct` (ShapeDtypeStructs) with leading axes `lead`;
    Python scalars (fixed flags in a solver's state) become arrays of them, so that
    every leaf of the loop's carry is an array with the leading axes."""

    def zeros(s):
        if isinstance(s, jax.ShapeDtypeStruct):
            return jnp.zeros(lead + s.shape, s.dtype)
        return jnp.full(lead, s)

    return jax.tree.map(zeros, struct)


@eqx.filter_jit
def fresh_state(problem: Problem, controls: Controls, queue, data, n_slots: int,
                n_devices: int | None = None):  # fmt: skip
    """The state before anything ran: every lane idle and done, so the first
    refill gives each a member; outputs zero. With `n_devices`, each device has
    `problem.lanes` lanes and its own queue counters."""
    lane, row = eqx.filter_eval_shape(
        lambda p: _load(problem, controls, p, data), _take(queue, 0)
    )
    n_members = jax.tree.leaves(queue)[0].shape[0]
    n_times = controls.ts.shape[0]
    n_lanes = problem.lanes * (n_devices or 1)
    local_members = n_members // (n_devices or 1)
    lanes = _zeros(lane, (n_lanes,))
    lanes = eqx.tree_at(
        lambda s: (s.member, s.done, s.running),
        lanes,
        (jnp.full((n_lanes,), local_members, jnp.int32),
         jnp.ones(n_lanes, bool), jnp.zeros(n_lanes, bool)),
    )  # fmt: skip
    count = jnp.zeros(n_members, jnp.int32)
    out = Outputs(
        ts=jnp.zeros((n_members, n_times), controls.ts.dtype),
        loss=_zeros(row.loss, (n_members, n_times)),
        grad_norm=_zeros(row.grad_norm, (n_members, n_times)),
        metrics=_zeros(row.metrics, (n_members, n_times)),
        params=_zeros(row.params, (n_members, n_slots)),
        velocity=_zeros(row.velocity, (n_members, n_slots)),
        n_rows=count, code=count, steps=count, accepted=count, grads=count,
        row_grads=count, hvps=count,
    )  # fmt: skip
    zero = jnp.zeros(() if n_devices is None else (n_devices,), jnp.int32)
    return State(lanes=lanes, out=out, next_member=zero, iterations=zero,
                 queued_iterations=zero, queued_busy=zero)  # fmt: skip


def _loop(problem: Problem, controls: Controls, queue, data, state: State, budget):
    """Fill idle lanes, then step until every member is done or `budget`
    iterations have run."""
    n_lanes = problem.lanes
    state = _finish_and_refill(
        problem, controls, queue, state, jnp.zeros(n_lanes, controls.ts.dtype),
        state.lanes.y, data,
    )  # fmt: skip
    meter = _meter(problem.progress)
    # (Capped: iterations + budget must not overflow int32.)
    stop_at = state.iterations + jnp.minimum(budget, _MAX_ITERATIONS - state.iterations)

    def cond(carry):
        state, _ = carry
        return jnp.any(state.lanes.running) & (state.iterations < stop_at)

    def body(carry):
        state, meter_state = carry
        state = _step_all(problem, controls, queue, state, data)
        progress = jnp.min(jnp.where(state.lanes.running, state.lanes.t,
                                     controls.ts[-1])) / controls.ts[-1]  # fmt: skip
        return state, meter.step(meter_state, progress)

    state, meter_state = jax.lax.while_loop(cond, body, (state, meter.init()))
    meter.close(meter_state)
    return state


def _counters(state: State):
    return [state.next_member, state.iterations, state.queued_iterations,
            state.queued_busy]  # fmt: skip


def _meter(progress: bool):
    if not progress:
        return diffrax.NoProgressMeter()
    try:
        return diffrax.TqdmProgressMeter()
    except ImportError:
        return diffrax.TextProgressMeter()


def advance(problem: Problem, controls: Controls, queue, data, state: State, budget,
            mesh=None):  # fmt: skip
    """Run the loop from `state` for at most `budget` iterations: one compiled
    program. With a `mesh`, lanes and members are split across its devices, each
    device running its own loop on its own share (`problem.lanes` lanes each).

    `state` is donated: the result reuses its buffers (the lanes' solver states and
    the members' outputs are then held once, not twice), so it must not be used
    afterwards."""
    return _advance((problem, controls, queue, data, budget, mesh), state)


# Everything but the state is the first argument: only the state is donated.
@eqx.filter_jit(donate="all-except-first")
def _advance(rest, state: State):
    problem, controls, queue, data, budget, mesh = rest
    if mesh is None:
        return _loop(problem, controls, queue, data, state, budget)
    spec = jax.sharding.PartitionSpec(mesh.axis_names[0])
    dynamic, static = eqx.partition((problem, controls, data, budget), eqx.is_array)

    def local(queue, state, dynamic):
        problem, controls, data, budget = eqx.combine(dynamic, static)
        # Queue counters are kept per device: one entry each.
        state = eqx.tree_at(_counters, state, [x[0] for x in _counters(state)])
        state = _loop(problem, controls, queue, data, state, budget)
        return eqx.tree_at(_counters, state, [x[None] for x in _counters(state)])

    # check_vma=False: the lanes' loops mix per-device and replicated values in ways
    # the varying-axis checker rejects; the devices' members are independent anyway.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, jax.sharding.PartitionSpec()),
        out_specs=spec,
        check_vma=False,
    )(queue, state, dynamic)
