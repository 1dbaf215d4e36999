"""The loop of an ensemble: lanes refilled from a queue of members.

Each iteration every running lane attempts a step (vmapped); then, a few lanes at a
time (`width`), the lanes whose loss crossed `stop_at_loss` locate the crossing,
the lanes write the rows their steps crossed (a member that is done, its last row),
and finished lanes record their member and take the next one from the queue, until
it drains, with no trip to the host.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._solvers import modes
from .._tree import tree_set, tree_take
from . import _step
from ._batch import fields, for_some, if_any, per_lane, set_lanes, where, with_fields
from ._problem import Controls, Lane, Outputs, Problem, Row, State, write_slot


def loop(problem: Problem, controls: Controls, queue, data, state: State, budget):
    """Step until every member is done, a lane wants the solver's other mode, or
    `budget` iterations have run.

    Every iteration ends with the refill, so the lanes of a fresh state (all done,
    none recorded) are filled by a first iteration in which no lane steps: the
    program holds one refill, not a second one before the loop (a member's start is
    a large part of the program, and XLA compiles each copy)."""
    stop_at = state.iterations + jnp.minimum(
        budget, jnp.iinfo(jnp.int32).max - state.iterations
    )

    def going(state):
        lanes = state.lanes
        wanting = _step.wanting_other_mode(problem, controls, lanes)
        unfilled = jnp.any(_unrecorded(lanes))  # only in a fresh state
        return (
            (jnp.any(lanes.running) | unfilled)
            & (state.iterations < stop_at)
            & ~jnp.any(wanting)
        )

    state = jax.lax.while_loop(
        going, lambda s: _step_all(problem, controls, queue, s, data), state
    )
    wanting = _step.wanting_other_mode(problem, controls, state.lanes)
    return eqx.tree_at(lambda s: s.switch, state, jnp.any(wanting))


def _step_all(problem: Problem, controls: Controls, queue, state: State, data):
    """One iteration: every running lane attempts a step; crossings, rows,
    finished members and refills follow, a few lanes at a time."""
    lanes, out = state.lanes, state.out
    t0 = lanes.t
    stepped, dense, accepted = _attempt_all(problem, controls, lanes, data)
    stepped = where(lanes.running, stepped, lanes)
    accepted &= lanes.running
    stops = jnp.full_like(lanes.code, _step.RUNNING)
    t_end = stepped.t
    if _step.asks_for_checks(problem, controls):
        checks = per_lane(
            lambda b, s, a: _step.checks(problem, controls, b, s, a, data),
            problem.lanes,
        )
        stepped, stops, crossed = checks(lanes, stepped, accepted)
        if controls.stop_at_loss is not None:
            t_end = _locate_crossings(
                problem, controls, crossed, t0, stepped.t, dense, t_end, data
            )
    stepped = per_lane(
        lambda b, s, a, c: _step.outcome(controls, b, s, a, c), problem.lanes
    )(lanes, stepped, accepted, stops)
    limit = jnp.where(stepped.done, t_end, stepped.t)
    state = eqx.tree_at(lambda s: s.lanes, state, stepped)
    start = (t0, lanes.carried)
    state = _write_rows(problem, controls, state, accepted, start, limit, dense, data)
    busy = jnp.sum(lanes.running, dtype=jnp.int32)
    # (A fresh state's first iteration, in which no lane steps, only fills them.)
    queued = (state.next_member < out.n_rows.size) & (busy > 0)
    state = _finish_and_refill(problem, controls, queue, state, data)
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
    steps in the common mode, and then (in mode "both") the lanes in the rare mode
    step again in theirs, gathered `width` at a time: each lane's step is the one
    it takes alone, and the rare method costs only what its lanes need. They are
    gathered costliest first (a stabilized step's stage count varies from lane to
    lane, and a batch runs as many stages as its costliest lane), so lanes of like
    cost share one.
    """

    def attempt(solver, width):
        one = eqx.tree_at(lambda p: p.solver, problem, solver)
        return per_lane(lambda lane: _step.attempt(one, controls, lane, data), width)

    split = modes(problem.solver)
    if split is None or problem.mode is None:
        return attempt(problem.solver, problem.lanes)(lanes)
    if problem.mode != "both":
        return attempt(_step.in_mode(problem).solver, problem.lanes)(lanes)
    attempt_rare = attempt(split.rare_beside_common, problem.width)
    cost = jnp.where(lanes.running, split.rare_cost(lanes.solver_state), 0)

    # Positions in this order: the rare lanes first. Sorting the lanes costs more
    # than a step of small members does (1,000 float32 members that never
    # switched ran 1.2x faster without it), so only iterations in which some lane
    # is in the rare mode sort them.
    order = jax.lax.cond(
        jnp.any(cost > 0),
        lambda: jnp.argsort(-cost),
        lambda: jnp.arange(problem.lanes),
    )

    def work(carry, position):
        todo, result = carry
        lane = order[jnp.minimum(position, problem.lanes - 1)]
        target = jnp.where(position < problem.lanes, lane, problem.lanes)
        stepped, dense, keep = attempt_rare(tree_take(lanes, lane))
        written = tree_set(
            fields(result[0], _step.ATTEMPT_WRITES),
            target,
            fields(stepped, _step.ATTEMPT_WRITES),
        )
        return (
            todo.at[position].set(False, mode="drop"),
            (
                with_fields(result[0], written),
                *tree_set(result[1:], target, (dense, keep)),
            ),
        )

    result = attempt(split.common, problem.lanes)(lanes)
    carry = (cost[order] > 0, result)
    return for_some(lambda c: c[0], work, carry, problem.width)[1]


def _locate_crossings(problem, controls, crossed, t0, t1, dense, t_end, data):
    """t_end at the loss crossing of the lanes that crossed."""
    locate = per_lane(
        lambda a, b, d: _step.locate_loss_crossing(problem, controls, a, b, d, data)[0],
        problem.width,
    )

    def work(carry, index):
        todo, t_end = carry
        lane = jnp.minimum(index, todo.shape[0] - 1)
        root = locate(t0[lane], t1[lane], tree_take(dense, lane))
        return (
            todo.at[index].set(False, mode="drop"),
            t_end.at[index].set(root, mode="drop"),
        )

    return for_some(lambda c: c[0], work, (crossed, t_end), problem.width)[1]


def _write_rows(problem, controls, state, accepted, start, limit, dense, data):
    """Write every save row that the lanes' accepted steps crossed, and the last
    row of each member that is done (at the time it ended)."""

    def pending(state):
        lanes = state.lanes
        due = _step.row_due(controls, lanes, accepted, limit)
        return due | (lanes.done & ~lanes.closed)

    def work(state, index):
        lanes, out = state.lanes, state.out
        lane = jnp.minimum(index, problem.lanes - 1)
        picked = tree_take(fields(lanes, _ROW_READS + _ROW_WRITES), lane)
        regular = _step.row_due(controls, picked, accepted[lane], limit[lane])

        def next_row(picked, start, dense, limit, regular):
            return _step.next_row(
                problem, controls, picked, start, dense, limit, regular, data
            )

        row, t, slot, values = per_lane(next_row, problem.width)(
            picked,
            tree_take(start, lane),
            tree_take(dense, lane),
            limit[lane],
            regular,
        )
        member = jnp.where(index < problem.lanes, picked.member, out.n_rows.size)
        out = _write(out, member, row, t, values, slot)
        wrote = per_lane(
            lambda p, r, t, g, w: _step.wrote_row(problem, p, r, t, g, w),
            problem.width,
        )(picked, row, t, regular, values)
        written = set_lanes(
            fields(lanes, _ROW_WRITES), index, fields(wrote, _ROW_WRITES)
        )
        lanes = with_fields(lanes, written)
        return eqx.tree_at(lambda s: (s.lanes, s.out), state, (lanes, out))

    return for_some(pending, work, state, problem.width)


# What `_write_rows` reads of a lane, besides what it writes.
_ROW_READS = ("member", "t", "done")
_ROW_WRITES = (
    "row", "last_t", "row_grads", "hvps", "thirds", "closed", "metrics_carried"
)  # fmt: skip


def _write(out: Outputs, member, row, t, values: Row, slot) -> Outputs:
    """Write rows `row` of members `member` (indices past the end are dropped) and
    their parameters into `slot`."""
    at = (member, row)
    out = write_slot(out, (member, slot), values)
    return eqx.tree_at(
        lambda o: (o.ts, o.loss, o.grad_norm, o.metrics),
        out,
        (
            out.ts.at[at].set(t, mode="drop"),
            out.loss.at[at].set(values.loss, mode="drop"),
            out.grad_norm.at[at].set(values.grad_norm, mode="drop"),
            tree_set(out.metrics, at, values.metrics),
        ),
    )


_COUNTERS = ("code", "steps", "accepted", "grads", "row_grads", "hvps", "thirds")
_IDLE = ("member", "running", "done")


def _finish_and_refill(problem, controls, queue, state, data):
    """Record every member that is done (its counters and result: its last row is
    written) and give its lane the next member of the queue, until no lane is
    done."""
    n_members = state.out.n_rows.size
    load = per_lane(lambda p: _step.load(problem, controls, p, data), problem.width)

    def work(state, index):
        lanes = state.lanes
        real = index < problem.lanes
        picked = tree_take(
            fields(lanes, ("member", "row", *_COUNTERS)),
            jnp.minimum(index, problem.lanes - 1),
        )
        member = jnp.where(real & (picked.member < n_members), picked.member, n_members)
        counters = dict(n_rows=picked.row, **{k: getattr(picked, k) for k in _COUNTERS})
        out = eqx.tree_at(
            lambda o: tuple(getattr(o, k) for k in counters),
            state.out,
            tuple(
                getattr(state.out, k).at[member].set(v, mode="drop")
                for k, v in counters.items()
            ),
        )
        # The next members of the queue go to these lanes, in lane order.
        queued = state.next_member + jnp.cumsum(real, dtype=jnp.int32) - 1
        takes = real & (queued < n_members)
        members = jnp.where(takes, queued, n_members)
        loaded, first = if_any(
            takes, load, tree_take(queue, jnp.minimum(members, n_members - 1))
        )
        loaded = eqx.tree_at(lambda s: s.member, loaded, members)
        # Lanes left without a member are idle: only these fields change.
        idle = eqx.tree_at(
            lambda s: (s.member, s.running, s.done),
            fields(loaded, _IDLE),
            (members, jnp.zeros_like(takes), jnp.zeros_like(takes)),
        )
        lanes = set_lanes(lanes, jnp.where(takes, index, problem.lanes), loaded)
        left = jnp.where(takes, problem.lanes, index)
        lanes = with_fields(lanes, set_lanes(fields(lanes, _IDLE), left, idle))
        out = _write(
            out,
            members,
            jnp.zeros_like(members),
            controls.ts[0],
            first,
            controls.slot[0],
        )
        # A member that stops at t = 0 ends there: its first row is its last.
        final = jnp.where(loaded.closed, members, n_members)
        out = write_slot(out, (final, controls.final_slot), first)
        return eqx.tree_at(
            lambda s: (s.lanes, s.out, s.next_member),
            state,
            (lanes, out, state.next_member + jnp.sum(takes, dtype=jnp.int32)),
        )

    return for_some(lambda s: _unrecorded(s.lanes), work, state, problem.width)


def _unrecorded(lanes: Lane):
    """The lanes whose member is done, its last row written, and not yet recorded."""
    return lanes.done & lanes.closed
