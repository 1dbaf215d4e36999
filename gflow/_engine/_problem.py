"""The engine's data model: what is solved (`Problem`), the numbers of a run
(`Controls`), one member's solve in progress (`Lane`), what members produce
(`Outputs`), the loop's carry (`State`) and the values of a saved row (`Row`).

What changes the compiled program and what does not: a `Problem`'s static fields
and its Python functions (the loss, the metrics, the stop rule, the flow's kind and
the solver) are the program's identity; its arrays (a flow's learning rate, the
leaves held fixed inside the loss) and every `Controls` array are arguments of the
program, so new values reuse it. Save times are padded (to 1,024 for a single
run where that fits, else to a power of two: `size_class`), so a new number of
them reuses it too. Whether an optional control
is None (`dt0`, `stop_at_loss`, `stop_at_grad_norm`) and whether a stop rule is
given does change the program: what a call does not ask for is not compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import check_functions
from .._tree import tree_norm, tree_set
from ..flows import AbstractFlow, FlowState, Work
from ..flows._base import value_and_grad
from ..metrics import AbstractCarriedMetric

#: The modes a program steps a solver with two methods (gflow's "auto") in: the
#: common method only (the program stops when a lane wants the other), the rare
#: method only (one lane), or both (an ensemble's lanes in either).
MODES = (None, "common", "rare", "both")


class Metrics(eqx.Module):
    """`{name: fn(params, data)}` evaluated on every saved state; a
    `gflow.metrics.AbstractCarriedMetric` entry also takes what the row before
    left it (`carried`, by name) and returns what the next row starts from.

    Attributes:
        fns: the metrics as a tuple of `(name, fn)` pairs (hashable: part of the
            compiled program's identity).
    """

    fns: tuple[tuple[str, Callable], ...]

    @classmethod
    def build(cls, metrics: Mapping[str, Callable] | None) -> Metrics:
        return cls(check_functions("metrics", metrics))

    @property
    def carries(self) -> bool:
        """Whether a metric carries something from row to row."""
        return any(isinstance(fn, AbstractCarriedMetric) for _, fn in self.fns)

    def init(self, params: Any, data: Any) -> dict[str, Any]:
        """What the carried metrics start from at the first row, by name."""
        return {
            name: fn.init(params, data)
            for name, fn in self.fns
            if isinstance(fn, AbstractCarriedMetric)
        }

    def __call__(
        self, params: Any, data: Any, carried: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The metrics' values, and what the carried ones leave the next row."""
        values, carried = {}, dict(carried)
        for name, fn in self.fns:
            try:
                if isinstance(fn, AbstractCarriedMetric):
                    value, carried[name] = fn(params, data, carried[name])
                else:
                    value = fn(params, data)
            except Exception as e:  # noqa: BLE001 - re-raised naming the metric
                raise ValueError(
                    f"metric {name!r} failed on the parameters: {type(e).__name__}: {e}"
                ) from e
            for leaf in jax.tree.leaves(value):
                if not (eqx.is_array(leaf) or isinstance(leaf, int | float | bool)):
                    raise TypeError(
                        f"metric {name!r} must return numbers or arrays (or a "
                        f"dict, list or tuple of them); it returned a "
                        f"{type(leaf).__name__}."
                    )
            values[name] = value
        return values, carried

    def shapes(self, params: Any, data: Any) -> dict[str, Any]:
        """The shapes of the metrics' values at one row (nothing compiles)."""
        return jax.eval_shape(lambda p, d: self(p, d, self.init(p, d))[0], params, data)


class Problem(eqx.Module):
    """What is solved: the loss (of the trained leaves), the flow, the solver, the
    metrics and stop rule, and how the program is laid out (`lanes` stepping at
    once, `width` of them served at a time, the solver's `mode`)."""

    loss_fn: Callable
    flow: AbstractFlow
    solver: diffrax.AbstractSolver
    adaptive: bool = eqx.field(static=True)
    metrics: Metrics
    stop_when: Callable | None
    lanes: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    mode: str | None = eqx.field(default=None, static=True)

    def terms(self, controls: Controls, noise, y: FlowState, carried, data):
        """The equation's terms, with what the flow carries (`carried`) as the
        vector field's argument; an SDE flow's Brownian motion is a virtual
        Brownian tree drawn from the lane's key `noise`, resolved to dt0 / 2."""
        if not self.flow.is_sde:
            return self.flow.terms(self.loss_fn, carried)
        path = diffrax.VirtualBrownianTree(
            controls.ts[0],
            controls.ts[-1],
            tol=controls.dt0 / 2,
            shape=self.flow.noise_shape(y.params, data),
            key=jax.random.wrap_key_data(noise),
        )
        return self.flow.terms(self.loss_fn, carried, path)

    def cost(self, evaluations, solver_hvps, carried) -> Work:
        """The work of `evaluations` of the terms in a step that carries
        `carried`, with the solver's own Hessian-vector products."""
        each = self.flow.evaluation_cost(carried)
        counted = jnp.asarray(evaluations) >= 0  # implicit solvers: -1, not counted
        return Work(
            jnp.where(counted, evaluations * each.grads, evaluations),
            jnp.where(counted, evaluations * each.hvps + solver_hvps, solver_hvps),
            jnp.where(counted, evaluations * each.thirds, 0),
        )


class Controls(eqx.Module):
    """The numbers of a run: arrays, arguments of the compiled program.

    `ts` and `slot` are padded (`_prepare.padded_saves`): `ts` with copies of
    `t_max` (so `ts[-1]` is `t_max`), `slot` with an index past the last slot;
    `n_times` says how many save times are real."""

    ts: jax.Array  # (T,) save times, padded with t_max
    n_times: jax.Array  # () int32: how many of `ts` are real
    slot: jax.Array  # (T,) int32: the parameter slot of each save row; past the end
    #                  if it keeps none
    final_slot: jax.Array  # () int32: the slot of a member's last row
    switch_after: jax.Array  # a lane switches to a solver's rare method from then on
    rtol: jax.Array
    atol: jax.Array
    dt0: jax.Array | None
    stop_at_loss: jax.Array | None
    stop_at_grad_norm: jax.Array | None
    max_steps: jax.Array


class Lane(eqx.Module):
    """One member's solve in progress (in a batch, every field has a leading lane
    axis)."""

    member: jax.Array  # the member it holds; M when none
    noise: Any  # an SDE flow's key (raw uint32), None otherwise
    t: jax.Array  # time reached (last accepted step)
    tnext: jax.Array  # end of the next step attempt
    y: FlowState  # what the flow integrates
    carried: Any  # what the flow carries besides (None: nothing)
    solver_state: Any
    controller_state: Any
    steps: jax.Array
    accepted: jax.Array
    grads: jax.Array  # gradients spent stepping (initial step included)
    row_grads: jax.Array  # gradients spent on saved rows and stopping checks
    hvps: jax.Array
    thirds: jax.Array  # third-order products ∇(uᵀ H v)
    row: jax.Array  # the next row to write
    metrics_carried: Any  # what the carried metrics left the next row, by name
    last_t: jax.Array  # the time of the last row written
    loss_gap: jax.Array  # loss - stop_at_loss at t
    code: jax.Array  # RESULTS code: "running" until done
    running: jax.Array  # still stepping
    done: jax.Array  # stopped stepping: its last row and counters to be recorded
    closed: jax.Array  # its last row is written (its counters are next)


class Outputs(eqx.Module):
    """What the members produced, indexed by member."""

    ts: jax.Array  # (M, T)
    loss: jax.Array
    grad_norm: jax.Array
    metrics: Any
    params: Any  # (M, S, ...)
    velocity: Any
    state: Any  # the flow's own variables (`FlowState.extra`), kept likewise
    n_rows: jax.Array  # (M,)
    code: jax.Array
    steps: jax.Array
    accepted: jax.Array
    grads: jax.Array
    row_grads: jax.Array
    hvps: jax.Array
    thirds: jax.Array


def write_slot(out: Outputs, at, values: Row) -> Outputs:
    """`out` with the parameters, velocities and the flow's own variables of
    `values` written at index `at` of their slots (past the end: dropped)."""
    return eqx.tree_at(
        lambda o: (o.params, o.velocity, o.state),
        out,
        (
            tree_set(out.params, at, values.params),
            tree_set(out.velocity, at, values.velocity),
            tree_set(out.state, at, values.extra),
        ),
    )


class State(eqx.Module):
    """The loop's carry: everything needed to go on."""

    lanes: Lane
    out: Outputs
    next_member: jax.Array
    iterations: jax.Array
    # While members are still queued: iterations, and lane-steps of running lanes.
    queued_iterations: jax.Array
    queued_busy: jax.Array
    # Whether the loop stopped because some lane wants the solver's other mode.
    switch: jax.Array


class Row(eqx.Module):
    """The values saved in one row."""

    loss: jax.Array
    grad_norm: jax.Array
    metrics: Any
    params: Any
    velocity: Any
    extra: Any  # the flow's own variables (`FlowState.extra`)
    work: Work  # the Hessian-vector and third-order products it spent
    metrics_carried: Any  # what the carried metrics leave the next row


def row_values(
    loss_fn, flow: AbstractFlow, metrics: Metrics, t, y, carried, data, from_last
) -> Row:
    """What a saved row holds for state `y` at time `t`: one gradient evaluation,
    and what the flow adds (`AbstractFlow.row`: its velocity and own metrics).
    `from_last`: what the carried metrics left this row (`Metrics.init` at the
    first)."""
    loss, grad = value_and_grad(loss_fn, y.params, data)
    return row_from(loss_fn, flow, metrics, t, y, carried, data, from_last, loss, grad)


def row_from(
    loss_fn, flow: AbstractFlow, metrics: Metrics, t, y, carried, data, from_last,
    loss, grad,
):  # fmt: skip
    """`row_values` with the loss and gradient at `y` already computed."""
    velocity, own, work = flow.row(loss_fn, t, y, carried, data, loss, grad)
    values, metrics_carried = metrics(y.params, data, from_last)
    return Row(
        loss=loss,
        grad_norm=tree_norm(grad),
        metrics={**values, **own},
        params=y.params,
        velocity=velocity,
        extra=y.extra,
        work=jax.tree.map(lambda w: jnp.asarray(w, jnp.int32), work),
        metrics_carried=metrics_carried,
    )


def size_class(n: int, smallest: int = 1) -> int:
    """The padded length of `n` save times or parameter slots: the power of two at
    or above `n` (and `smallest`). Lengths in one class share a compiled program:
    a new number of save times recompiles only past the next power of two."""
    return max(smallest, 1 << max(n - 1, 0).bit_length())
