"""The loop of one member (`gflow.simulate`): no queue, no refill, no batch.

The program holds only what such a solve needs: the member's start (when the state
is fresh), its step attempts, the stopping checks the run asks for, the location of
a loss crossing (a branch taken once), and the rows each step crosses, its last row
among them.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import tree_set, tree_take
from . import _step
from ._problem import Controls, Lane, Outputs, Problem, Row, State, write_slot


def loop(problem: Problem, controls: Controls, queue, data, state: State, budget):
    """Start the member if the state is fresh, then step until it is done, a lane
    wants the solver's other mode, or `budget` iterations have run."""
    lane, out = tree_take(state.lanes, 0), tree_take(state.out, 0)
    if problem.mode != "rare":  # a member always starts in the common mode
        lane, out = jax.lax.cond(
            lane.member > 0,  # fresh: no member yet
            lambda: _start(problem, controls, tree_take(queue, 0), data, out),
            lambda: (lane, out),
        )
    stop_at = state.iterations + jnp.minimum(
        budget, jnp.iinfo(jnp.int32).max - state.iterations
    )

    def going(carry):
        lane, _, iterations = carry
        wanting = _step.wanting_other_mode(problem, controls, _batch_of_one(lane))
        return lane.running & (iterations < stop_at) & ~wanting[0]

    def body(carry):
        lane, out, iterations = carry
        lane, out = _iteration(problem, controls, lane, out, data)
        return lane, out, iterations + 1

    lane, out, iterations = jax.lax.while_loop(
        going, body, (lane, out, state.iterations)
    )
    out = jax.lax.cond(lane.done & lane.closed, _record, lambda l, o: o, lane, out)
    lane = eqx.tree_at(lambda s: s.done, lane, lane.done & ~lane.closed)
    lanes = _batch_of_one(lane)
    wanting = _step.wanting_other_mode(problem, controls, lanes)
    return eqx.tree_at(
        lambda s: (s.lanes, s.out, s.next_member, s.iterations, s.switch),
        state,
        (
            lanes,
            _batch_of_one(out),
            jnp.ones_like(state.next_member),  # the member was taken
            iterations,
            jnp.any(wanting),
        ),
    )


def _batch_of_one(tree):
    return jax.tree.map(lambda x: x[None] if eqx.is_array(x) else x, tree)


def _start(problem, controls, entry, data, out: Outputs):
    """The lane of the member, with its first row written."""
    lane, first = _step.load(problem, controls, entry, data)
    out = _write(out, 0, controls.ts[0], first, controls.slot[0])
    # A member that stops at t = 0 ends there: its first row is its last.
    n_slots = jax.tree.leaves(out.params)[0].shape[0]
    final = jnp.where(lane.closed, controls.final_slot, n_slots)
    return lane, write_slot(out, final, first)


def _iteration(problem: Problem, controls: Controls, lane: Lane, out, data):
    """One step attempt, its checks, and the rows it crossed."""
    stepping = _step.in_mode(problem)
    t0 = lane.t
    stepped, dense, accepted = _step.attempt(stepping, controls, lane, data)
    stops = jnp.asarray(_step.RUNNING, jnp.int32)
    t_end = stepped.t
    if _step.asks_for_checks(problem, controls):
        stepped, stops, crossed = _step.checks(
            problem, controls, lane, stepped, accepted, data
        )
        if controls.stop_at_loss is not None:
            t_end = jax.lax.cond(
                crossed,
                lambda: _step.locate_loss_crossing(
                    stepping, controls, t0, stepped.t, dense, data
                )[0],
                lambda: t_end,
            )
    stepped = _step.outcome(controls, lane, stepped, accepted, stops)
    limit = jnp.where(stepped.done, t_end, stepped.t)
    start = (t0, lane.carried)
    return _write_rows(
        stepping, controls, stepped, out, start, dense, limit, accepted, data
    )


def _write_rows(
    problem, controls, lane: Lane, out, start, dense, limit, accepted, data
):
    """Write the save rows the step crossed, and the last row if the member is
    done."""

    def pending(carry):
        lane, _ = carry
        return _step.row_due(controls, lane, accepted, limit) | (
            lane.done & ~lane.closed
        )

    def body(carry):
        lane, out = carry
        regular = _step.row_due(controls, lane, accepted, limit)
        row, t, slot, values = _step.next_row(
            problem, controls, lane, start, dense, limit, regular, data
        )
        out = _write(out, row, t, values, slot)
        return _step.wrote_row(problem, lane, row, t, regular, values), out

    return jax.lax.while_loop(pending, body, (lane, out))


def _write(out: Outputs, row, t, values: Row, slot) -> Outputs:
    """Write row `row` (dropped past the end) and its parameters into `slot`."""
    out = eqx.tree_at(
        lambda o: (o.ts, o.loss, o.grad_norm, o.metrics),
        out,
        (
            out.ts.at[row].set(t, mode="drop"),
            out.loss.at[row].set(values.loss, mode="drop"),
            out.grad_norm.at[row].set(values.grad_norm, mode="drop"),
            tree_set(out.metrics, row, values.metrics),
        ),
    )
    return write_slot(out, slot, values)


def _record(lane: Lane, out: Outputs) -> Outputs:
    """The member's counters and result, once its last row is written."""
    return eqx.tree_at(
        lambda o: (
            o.n_rows,
            o.code,
            o.steps,
            o.accepted,
            o.grads,
            o.row_grads,
            o.hvps,
            o.thirds,
        ),
        out,
        (
            lane.row,
            lane.code,
            lane.steps,
            lane.accepted,
            lane.grads,
            lane.row_grads,
            lane.hvps,
            lane.thirds,
        ),
    )
