"""The compiled entry: one program per call, the loop of one member or of an
ensemble's lanes (split across devices with a mesh); and the state it starts from,
built on the host so that nothing but that program compiles."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np

from .._tree import tree_take, tree_zeros
from . import _many, _one, _step
from ._problem import Controls, Outputs, Problem, State


def blank_state(
    problem: Problem,
    controls: Controls,
    queue,
    data,
    n_slots: int,
    n_devices: int | None = None,
    single: bool = False,
) -> State:
    """The state before anything ran (NumPy arrays: nothing is compiled): every
    lane idle and done, so that the loop's first refill gives each a member;
    outputs zero. `n_slots` is the padded number of parameter slots. With
    `n_devices`, each device has `problem.lanes` lanes and its own queue
    counters. `single`: the queue is one member, without a member axis."""
    entry = queue if single else tree_take(queue, 0)
    lane, row = _shapes_of_load(problem, controls, entry, data)
    n_members = 1 if single else jax.tree.leaves(queue)[0].shape[0]
    n_times = controls.ts.shape[0]
    n_lanes = problem.lanes * (n_devices or 1)
    lanes = tree_zeros(lane, (n_lanes,), xp=np)
    none = np.full(n_lanes, n_members // (n_devices or 1), np.int32)
    idle = np.ones(n_lanes, bool)
    lanes = eqx.tree_at(
        lambda s: (s.member, s.done, s.closed), lanes, (none, idle, idle.copy())
    )
    count = np.zeros(n_members, np.int32)
    out = Outputs(
        ts=np.zeros((n_members, n_times), controls.ts.dtype),
        loss=tree_zeros(row.loss, (n_members, n_times), xp=np),
        grad_norm=tree_zeros(row.grad_norm, (n_members, n_times), xp=np),
        metrics=tree_zeros(row.metrics, (n_members, n_times), xp=np),
        params=tree_zeros(row.params, (n_members, n_slots), xp=np),
        velocity=tree_zeros(row.velocity, (n_members, n_slots), xp=np),
        state=tree_zeros(row.extra, (n_members, n_slots), xp=np),
        n_rows=count,
        code=count.copy(),
        steps=count.copy(),
        accepted=count.copy(),
        grads=count.copy(),
        row_grads=count.copy(),
        hvps=count.copy(),
        thirds=count.copy(),
    )
    zero = np.zeros(() if n_devices is None else (n_devices,), np.int32)
    return State(
        lanes=lanes,
        out=out,
        next_member=zero,
        iterations=zero.copy(),
        queued_iterations=zero.copy(),
        queued_busy=zero.copy(),
        switch=np.zeros(zero.shape, bool),
    )


def _shapes_of_load(problem: Problem, controls: Controls, entry, data):
    """The shapes of a loaded lane and of its first row (`_step.load`): traced
    once for a problem and the shapes of its arguments, then remembered, so that a
    second call of the same kind traces nothing."""
    dynamic, static = eqx.partition((problem, controls, entry, data), eqx.is_array)
    arrays, layout = jax.tree.flatten(dynamic)
    fixed, fixed_layout = jax.tree.flatten(static)
    key = (
        layout,
        fixed_layout,
        tuple(fixed),
        tuple((np.shape(x), np.dtype(x.dtype)) for x in arrays),
    )
    try:
        return _LOADED[key]
    except (KeyError, TypeError):  # TypeError: a part that cannot be hashed
        pass
    shapes = eqx.filter_eval_shape(_step.load, problem, controls, entry, data)
    try:
        if len(_LOADED) >= 64:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = shapes
    except TypeError:
        pass
    return shapes


_LOADED: dict = {}


def advance(
    problem: Problem,
    controls: Controls,
    queue,
    data,
    state: State,
    budget,
    mesh=None,
    single: bool = False,
) -> State:
    """Run the loop from `state` for at most `budget` iterations: one compiled
    program. A `single` member (its queue entry without a member axis) runs the
    loop of one member; otherwise the lanes' loop, and with a `mesh` lanes and
    members are split across its devices, each device running its own loop on its
    own share (`problem.lanes` lanes each).

    `state` is donated: the result reuses its buffers (the lanes' solver states and
    the members' outputs are then held once, not twice), so it must not be used
    afterwards."""
    return _advance((problem, controls, queue, data, budget, mesh, single), state)


def _counters(state: State):
    return [
        state.next_member,
        state.iterations,
        state.queued_iterations,
        state.queued_busy,
        state.switch,
    ]


# Everything but the state is the first argument: only the state is donated.
@eqx.filter_jit(donate="all-except-first")
def _advance(rest, state: State):
    problem, controls, queue, data, budget, mesh, single = rest
    if single:
        queue = jax.tree.map(lambda x: x[None], queue)
        return _one.loop(problem, controls, queue, data, state, budget)
    if mesh is None:
        return _many.loop(problem, controls, queue, data, state, budget)
    spec = jax.sharding.PartitionSpec(mesh.axis_names[0])
    dynamic, static = eqx.partition((problem, controls, data, budget), eqx.is_array)

    def local(queue, state, dynamic):
        problem, controls, data, budget = eqx.combine(dynamic, static)
        # Queue counters are kept per device: one entry each.
        state = eqx.tree_at(_counters, state, [x[0] for x in _counters(state)])
        state = _many.loop(problem, controls, queue, data, state, budget)
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
