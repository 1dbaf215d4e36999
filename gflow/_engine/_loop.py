"""The scheduler and the compiled entry: every lane attempts a step; then rows,
stops, finished members and refills are served a few lanes at a time; the loop runs
until every member is done (or a budget of iterations is spent)."""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._results import RUNNING, result_code
from .._solvers import modes
from .._tree import tree_set, tree_take
from . import _step
from ._batch import for_some, if_any, per_lane, where, zeros
from ._problem import Controls, Lane, Outputs, Problem, Row, State
from ._step import STOP_CODES

_MAX_ITERATIONS = jnp.iinfo(jnp.int32).max
_SUCCESSFUL = result_code("successful")
_MAX_STEPS_REACHED = result_code("max_steps_reached")


def _write(out: Outputs, member, row, t, values: Row, slot) -> Outputs:
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
            tree_set(out.metrics, at, values.metrics),
            tree_set(out.params, (member, slot), values.params),
            tree_set(out.velocity, (member, slot), values.velocity),
        ),
    )


def _step_all(problem: Problem, controls: Controls, queue, state: State, data):
    """One iteration: every running lane attempts a step; rows, stops, finished
    members and refills follow, a few lanes at a time."""
    lanes, out = state.lanes, state.out
    t_before = lanes.t
    stepped, dense, accepted = _attempt_all(problem, controls, lanes, data)
    stepped = where(lanes.running, stepped, lanes)
    accepted &= lanes.running
    t_end = stepped.t
    stops = RUNNING * jnp.ones_like(lanes.code)
    y_end = stepped.y
    if (
        controls.stop_at_loss is not None
        or controls.stop_at_grad_norm is not None
        or (problem.stop_when is not None)
    ):
        events = per_lane(
            lambda lane: _step.events(problem, controls, lane, data), problem.lanes
        )
        gap, held, extra = events(stepped)
        stepped = eqx.tree_at(
            lambda s: (s.row_grads, s.loss_gap),
            stepped,
            (
                stepped.row_grads + extra * lanes.running,
                jnp.where(accepted, gap, stepped.loss_gap),
            ),
        )
        stops = jnp.where(accepted, held, stops)
        if controls.stop_at_loss is not None:
            crossed = accepted & (lanes.loss_gap > 0) & (gap <= 0)
            stops = jnp.where(crossed, STOP_CODES["loss"], stops)
            t_end, y_end = _locate_crossings(
                problem,
                controls,
                crossed,
                t_before,
                stepped.t,
                dense,
                t_end,
                y_end,
                data,
            )
    ended = stops != RUNNING
    finished = accepted & (stepped.t >= controls.ts[-1])
    over = stepped.running & (stepped.steps >= controls.max_steps)
    failed = stepped.code != RUNNING
    code = jnp.select(
        [ended, failed, finished, over],
        [stops, stepped.code, _SUCCESSFUL, _MAX_STEPS_REACHED],
        RUNNING,
    )
    done = lanes.running & (ended | finished | over | failed)
    stepped = eqx.tree_at(
        lambda s: (s.code, s.running, s.done),
        stepped,
        (code, lanes.running & ~done, done),
    )
    # Rows crossed by this step: up to where it ends; a member that is done writes
    # its last row (at t_end) when it is recorded.
    limit = jnp.where(done, t_end, stepped.t)
    state = _write_crossed_rows(
        problem,
        controls,
        eqx.tree_at(lambda s: s.lanes, state, stepped),
        accepted,
        t_before,
        limit,
        done,
        dense,
        data,
    )
    queued = state.next_member < out.n_rows.size
    busy = jnp.sum(lanes.running, dtype=jnp.int32)
    state = _finish_and_refill(problem, controls, queue, state, t_end, y_end, data)
    return eqx.tree_at(
        lambda s: (s.iterations, s.queued_iterations, s.queued_busy),
        state,
        (
            state.iterations + 1,
            state.queued_iterations + queued,
            state.queued_busy + jnp.where(queued, busy, 0),
        ),
    )


def _attempt_all(problem: Problem, controls: Controls, lanes: Lane, data):
    """Every lane's step attempt (`_step.attempt`, vmapped).

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
        return per_lane(lambda lane: _step.attempt(one, controls, lane, data), width)

    split = modes(problem.solver) if problem.lanes > 1 else None
    if split is None:
        return attempt(problem.solver, problem.lanes)(lanes)
    common, rare, rare_cost = split
    attempt_rare = attempt(rare, problem.width)
    cost = jnp.where(lanes.running, rare_cost(lanes.solver_state), 0)
    order = jnp.argsort(-cost)  # positions in this order: the rare lanes first

    def work(carry, position):
        todo, result = carry
        lane = order[jnp.minimum(position, problem.lanes - 1)]
        target = jnp.where(position < problem.lanes, lane, problem.lanes)
        return (
            todo.at[position].set(False, mode="drop"),
            tree_set(result, target, attempt_rare(tree_take(lanes, lane))),
        )

    result = attempt(common, problem.lanes)(lanes)
    return for_some(lambda c: c[0], work, (cost[order] > 0, result), problem.width)[1]


def _locate_crossings(problem, controls, crossed, t0, t1, dense, t_end, y_end, data):
    """t_end and y_end at the loss crossing of the lanes that crossed."""

    def pending(carry):
        return carry[0]

    def work(carry, index):
        todo, t_end, y_end = carry
        lane = jnp.minimum(index, todo.shape[0] - 1)
        locate = per_lane(
            lambda a, b, d: _step.locate_loss_crossing(
                problem, controls, a, b, d, data
            ),
            problem.width,
        )
        root, y = locate(t0[lane], t1[lane], tree_take(dense, lane))
        return (
            todo.at[index].set(False, mode="drop"),
            t_end.at[index].set(root, mode="drop"),
            tree_set(y_end, index, y),
        )

    _, t_end, y_end = for_some(pending, work, (crossed, t_end, y_end), problem.width)
    return t_end, y_end


def _write_crossed_rows(
    problem, controls, state, accepted, t0, limit, done, dense, data
):
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
            return _step.row(problem, interpolation.evaluate(t), data)

        new_values = per_lane(values, problem.width)(
            t0[lane], lanes.t[lane], tree_take(dense, lane), t
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

    return for_some(pending, work, state, problem.width)


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
        picked = tree_take(lanes, lane)
        # The last row: at t_end, replacing the last written row if at the same time.
        t_last = t_end[lane]
        row = jnp.where(
            (picked.row > 0) & (picked.last_t >= t_last), picked.row - 1, picked.row
        )
        has_member = real & (picked.member < n_members)
        member = jnp.where(has_member, picked.member, n_members)
        values = if_any(
            has_member,
            per_lane(lambda y: _step.row(problem, y, data), problem.width),
            tree_take(y_end, lane),
        )
        out = _write(out, member, row, t_last, values, final_slot)
        counters = dict(
            n_rows=row + 1,
            code=picked.code,
            steps=picked.steps,
            accepted=picked.accepted,
            grads=picked.grads,
            row_grads=picked.row_grads + 1,
            hvps=picked.hvps + problem.flow.row_hvps,
        )
        out = eqx.tree_at(
            lambda o: tuple(getattr(o, k) for k in counters),
            out,
            tuple(
                getattr(out, k).at[member].set(v, mode="drop")
                for k, v in counters.items()
            ),
        )
        # The next members of the queue go to these lanes, in lane order.
        queued = state.next_member + jnp.cumsum(real, dtype=jnp.int32) - 1
        takes = real & (queued < n_members)
        members = jnp.where(takes, queued, n_members)
        new_lanes, first_rows = if_any(
            takes,
            per_lane(lambda p: _step.load(problem, controls, p, data), problem.width),
            tree_take(queue, jnp.minimum(members, n_members - 1)),
        )
        new_lanes = eqx.tree_at(lambda s: s.member, new_lanes, members)
        idle = eqx.tree_at(
            lambda s: (s.member, s.running, s.done),
            picked,
            (
                jnp.full_like(picked.member, n_members),
                jnp.zeros_like(picked.running),
                jnp.zeros_like(picked.done),
            ),
        )
        lanes = tree_set(lanes, index, where(takes, new_lanes, idle))
        out = _write(
            out,
            members,
            jnp.zeros_like(members),
            controls.ts[0],
            first_rows,
            controls.slot[0],
        )
        # A member that is done at t = 0 ends there: its lane is recorded next round.
        t_end = t_end.at[index].set(controls.ts[0], mode="drop")
        y_end = tree_set(
            y_end, index, where(takes, new_lanes.y, tree_take(y_end, lane))
        )
        state = eqx.tree_at(
            lambda s: (s.lanes, s.out, s.next_member),
            state,
            (lanes, out, state.next_member + jnp.sum(takes, dtype=jnp.int32)),
        )
        return state, t_end, y_end

    state, _, _ = for_some(pending, work, (state, t_end, y_end), problem.width)
    return state


@eqx.filter_jit
def fresh_state(
    problem: Problem,
    controls: Controls,
    queue,
    data,
    n_slots: int,
    n_devices: int | None = None,
):
    """The state before anything ran: every lane idle and done, so the first
    refill gives each a member; outputs zero. With `n_devices`, each device has
    `problem.lanes` lanes and its own queue counters."""
    lane, row = eqx.filter_eval_shape(
        lambda p: _step.load(problem, controls, p, data), tree_take(queue, 0)
    )
    n_members = jax.tree.leaves(queue)[0].shape[0]
    n_times = controls.ts.shape[0]
    n_lanes = problem.lanes * (n_devices or 1)
    local_members = n_members // (n_devices or 1)
    lanes = zeros(lane, (n_lanes,))
    lanes = eqx.tree_at(
        lambda s: (s.member, s.done, s.running),
        lanes,
        (
            jnp.full((n_lanes,), local_members, jnp.int32),
            jnp.ones(n_lanes, bool),
            jnp.zeros(n_lanes, bool),
        ),
    )
    count = jnp.zeros(n_members, jnp.int32)
    out = Outputs(
        ts=jnp.zeros((n_members, n_times), controls.ts.dtype),
        loss=zeros(row.loss, (n_members, n_times)),
        grad_norm=zeros(row.grad_norm, (n_members, n_times)),
        metrics=zeros(row.metrics, (n_members, n_times)),
        params=zeros(row.params, (n_members, n_slots)),
        velocity=zeros(row.velocity, (n_members, n_slots)),
        n_rows=count,
        code=count,
        steps=count,
        accepted=count,
        grads=count,
        row_grads=count,
        hvps=count,
    )
    zero = jnp.zeros(() if n_devices is None else (n_devices,), jnp.int32)
    return State(
        lanes=lanes,
        out=out,
        next_member=zero,
        iterations=zero,
        queued_iterations=zero,
        queued_busy=zero,
    )


def _loop(problem: Problem, controls: Controls, queue, data, state: State, budget):
    """Fill idle lanes, then step until every member is done or `budget`
    iterations have run."""
    n_lanes = problem.lanes
    state = _finish_and_refill(
        problem,
        controls,
        queue,
        state,
        jnp.zeros(n_lanes, controls.ts.dtype),
        state.lanes.y,
        data,
    )
    meter = _meter(problem.progress)
    # (Capped: iterations + budget must not overflow int32.)
    stop_at = state.iterations + jnp.minimum(budget, _MAX_ITERATIONS - state.iterations)

    def cond(carry):
        state, _ = carry
        return jnp.any(state.lanes.running) & (state.iterations < stop_at)

    def body(carry):
        state, meter_state = carry
        state = _step_all(problem, controls, queue, state, data)
        progress = (
            jnp.min(jnp.where(state.lanes.running, state.lanes.t, controls.ts[-1]))
            / controls.ts[-1]
        )
        return state, meter.step(meter_state, progress)

    state, meter_state = jax.lax.while_loop(cond, body, (state, meter.init()))
    meter.close(meter_state)
    return state


def _counters(state: State):
    return [
        state.next_member,
        state.iterations,
        state.queued_iterations,
        state.queued_busy,
    ]


def _meter(progress: bool):
    if not progress:
        return diffrax.NoProgressMeter()
    try:
        return diffrax.TqdmProgressMeter()
    except ImportError:
        return diffrax.TextProgressMeter()


def advance(
    problem: Problem, controls: Controls, queue, data, state: State, budget, mesh=None
):
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
