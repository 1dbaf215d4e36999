"""simulate_ensemble(): the flows from a batch of initial parameters, solved together.

The engine (`_engine`) runs `lanes` members at a time in one compiled loop: when a
member is done (t_max, a stop, a failure) its lane records it and takes the next
member of the queue, so lanes stay busy until the queue drains, with no trip to the
host. Members are dealt to the devices in turn (member i to device i mod n), so
each device gets a share of the slow ones; with several processes
(`jax.distributed`), each process solves its share on its own devices and the
results are gathered. Members' outputs are kept on the device for a block of
members at a time (`memory_budget`), then moved to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from . import _run
from ._assemble import assemble, finish
from ._checks import check_int
from ._compile import Timing
from ._keywords import FLOW_KEYWORDS, takes_options
from ._options import Options
from ._prepare import build, prepare, queue
from ._trajectory import Trajectory
from .flows import AbstractFlow

_DEFAULT_MEMORY_BUDGET = 2**30
_MEMBER_AXIS = "members"
# Members per lane by default: enough that refilling keeps lanes busy, few enough
# that the lanes left running when the queue drains are a small part of the work.
_MEMBERS_PER_LANE = 16
_MAX_LANES_PER_DEVICE = 4096
# The loops that serve some of the lanes (stiff steps, rows, refills) take a batch of
# `width` lanes at a time: one lane in 16 by default. A batch also has a fixed cost
# (a loop iteration, gathering and scattering the lanes' state), which outweighs the
# work of a member whose parameters and data are tiny; such members are served at
# least 32 at a time. Measured warm, 1,000 members of a 2-parameter flow in 62
# lanes: 6.9 s at width 3, 3.1-3.7 s at 16 to 32. And 128 members of a 64-32-10
# MLP on 500 samples (37,000 elements) in 8 lanes: 56 s at width 1, 112 s at 8.
_SMALL_MEMBER = 1024
_SMALL_MEMBER_WIDTH = 32
# A lane-step of such small members costs little beyond its fixed cost, so they
# run wider: 4 members per lane. Measured warm at the defaults: 10,000 members of
# the 2-parameter Markov flow to t = 2000, 1.50 s in 625 lanes, 1.14 s in 1,250
# or 2,500; 512 tanh networks (65 parameters, 64 points) to t = 200, 19.7 s in 32
# lanes, 13.3 s in 256.
_SMALL_MEMBERS_PER_LANE = 4


@takes_options(*FLOW_KEYWORDS)
def simulate_ensemble(
    model: Any,
    data: Any,
    t_max: float,
    *,
    params0: Any = None,
    keys: Any = None,
    flow: AbstractFlow | None = None,
    noise_key: Any = None,
    save: Literal["trajectory", "final"] = "trajectory",
    lanes: int | None = None,
    memory_budget: int = _DEFAULT_MEMORY_BUDGET,
    devices: Sequence[jax.Device] | None = None,
    **options: Any,
) -> Trajectory:
    """The flows from a batch of initial parameters, solved together.

    Each member is its own flow on the same `data` and save times, with its own
    adaptive steps and its own stopping, and equals `gflow.simulate` of that member
    to round-off (the same steps and the same saves). The members run in `lanes`
    lanes of one compiled loop: a lane whose member is done takes the next member
    of the queue, so lanes stay busy until the queue drains. Lanes are split evenly
    across `devices`; with `jax.distributed` initialised, members are split across
    the processes too (see the "Ensembles" page of the documentation).

    Args:
        model: as in `gflow.simulate`.
        data: as in `gflow.simulate`, shared by every member.
        t_max: as in `gflow.simulate`.
        params0: the initial parameters of all members: a pytree (an equinox
            Module included) whose floating-point leaves all have the same leading
            (batch) axis; other leaves are held fixed. See `gflow.grid` for planes.
        keys: instead of `params0`, a batch of PRNG keys for `model.init`: a key
            array of shape `(B,)` (`jax.random.split(key, B)`), or raw uint32 keys
            of shape `(B, 2)`.
        flow: what to integrate (`gflow.flows`), as in `gflow.simulate`: the
            gradient flow by default, `ModifiedGD`, `HeavyBall`, `SGD` (one
            `noise_key` per member), `StableFlow`, `RodFlow`, `CentralFlow`, or a
            flow of your own.
        noise_key: a stochastic flow's keys (`gflow.flows.SGD`): one per member,
            `jax.random.split(key, B)`, so each member follows its own path.
        save: `"trajectory"` (default) saves every save time; `"final"` saves only
            `t = 0` and where each member ended (its final parameters, loss,
            metrics and stopping time), for large ensembles.
        lanes: how many members run at once (on all devices together). Default:
            one lane per 16 members (per 4 for members whose parameters and data
            hold at most 1,024 numbers), at most 4,096 per device, and as many
            as fit in `memory_budget`.
        memory_budget: bytes of device memory for the lanes' solver states and
            the members' saved rows (default 1 GiB). Members' results are moved
            to the host a block at a time, so the device never holds more.
        devices: the devices to split the lanes across (default: all local
            devices of the default backend).

    {keyword_args}

    Returns:
        A batched [`gflow.Trajectory`][]: `ts`, `loss` and `grad_norm` are
        `(B, T)`, each params leaf `(B, len(param_rows), ...)`. A member that
        stopped early has fewer rows than `T`: its last row (its end time and
        state) is repeated to fill its rows, and `stats["num_saved"][i]` says how
        many rows are its own. `traj.result` is an array of strings and
        `traj.stats` holds per-member arrays (`num_steps`, `num_grad_evals`,
        `num_saved`, `t_end`, ...) and totals (`wall_time_s`, `compile_time_s`,
        `member_steps`, `lane_steps`: the steps the lanes paid for, idle lanes
        included; `useful_share_until_drained`). `traj.member(i)` is member `i`
        as an ordinary Trajectory.

    Raises:
        ValueError, TypeError: bad arguments (the message names the argument).
        SimulationError: a member failed and `throw=True`.

    Examples:
        >>> model = gflow.models.MarkovCanonical(0.5, 0.8)
        >>> params0 = gflow.grid({"e": jnp.linspace(-2, 2, 50),
        ...                       "w": jnp.linspace(-2, 2, 50)})
        >>> ens = gflow.simulate_ensemble(model, None, 2000.0, params0=params0,
        ...                               save="final", stop_at_grad_norm=1e-5)
        >>> ens.loss[:, -1]          # each member's final loss, shape (2500,)
    """
    if save not in ("trajectory", "final"):
        raise ValueError(f"`save` must be 'trajectory' or 'final'; got {save!r}.")
    if save == "final":
        if "ts" in options or "params_at" in options:
            raise ValueError(
                "`ts` and `params_at` cannot be combined with save='final'."
            )
        options = dict(options, n_save=2, spacing="linear")
    prepared = prepare(
        "simulate_ensemble",
        model,
        data,
        t_max,
        options,
        simulate_ensemble.__gflow_keywords__,
        params0=params0,
        keys=keys,
        batched=True,
        flow=flow,
        noise_key=noise_key,
    )
    opts, batch = prepared.opts, prepared.members
    # Several processes: each solves its share of the members on its own devices.
    processes, rank = jax.process_count(), jax.process_index()
    share = np.array_split(np.arange(batch), processes)[rank]
    devices = _local_devices(devices)
    n_devices = len(devices)
    n_lanes, block = _sizes(
        lanes, memory_budget, prepared.one, data, opts, share.size, n_devices
    )
    mesh = None if n_devices == 1 else Mesh(np.asarray(devices), (_MEMBER_AXIS,))
    per_device = n_lanes // n_devices
    problem, controls, n_slots = build(
        prepared, lanes=per_device, width=_width(per_device, prepared.one, data)
    )
    out, counts, timing = _solve_share(
        problem,
        controls,
        queue(prepared),
        share,
        data,
        opts,
        mesh,
        n_devices,
        block,
        n_slots,
    )
    if processes > 1:
        out, counts = _gather(out, counts, share.size, batch)
    meta = dict(
        prepared.meta("ensemble"),
        save=save,
        batch_size=int(batch),
        lanes=int(n_lanes),
        block_size=int(block),
        num_devices=int(n_devices),
        num_processes=int(processes),
    )
    stats = dict(
        member_steps=int(np.sum(out.steps)),
        lane_steps=int(counts["lane_steps"]),
        useful_share_until_drained=float(
            counts["busy_before_drain"] / max(counts["lane_steps_before_drain"], 1)
        ),
    )
    traj = assemble(
        out, opts, meta, timing, batched=True, stats=stats, fixed=prepared.fixed
    )
    inputs = {"params0": prepared.params0, "data": data}
    return finish(traj, "simulate_ensemble", opts.throw, "flow", inputs, prepared.flow)


def _solve_share(
    problem,
    controls,
    queue,
    share,
    data,
    opts: Options,
    mesh,
    n_devices,
    block,
    n_slots,
):
    """This process's members, a block at a time; outputs on the host, in member
    order, the lanes' work counters and the timing of the blocks."""
    parts = []
    counts = dict(lane_steps=0, busy_before_drain=0, lane_steps_before_drain=0)
    timing = Timing()
    # On the host: indexing device arrays would compile a program per shape.
    queue = jax.tree.map(np.asarray, queue)
    for start in range(0, share.size, block):
        out, state, block_timing = _solve_block(
            problem,
            controls,
            queue,
            share[start : start + block],
            block,
            data,
            opts,
            mesh,
            n_devices,
            n_slots,
        )
        parts.append(out)
        timing.add(block_timing)
        # On the host: a reduction of device arrays would compile after the run.
        iterations, busy, queued = jax.device_get(
            (state.iterations, state.queued_busy, state.queued_iterations)
        )
        counts["lane_steps"] += int(np.sum(iterations)) * problem.lanes
        counts["busy_before_drain"] += int(np.sum(busy))
        counts["lane_steps_before_drain"] += int(np.sum(queued)) * problem.lanes
    return jax.tree.map(lambda *x: np.concatenate(x), *parts), counts, timing


def _solve_block(
    problem, controls, queue, members, block, data, opts, mesh, n_devices, n_slots
):
    """One block of members (padded to `block`, so every block runs the same
    program), dealt to the devices in turn; its outputs on the host, in member
    order."""
    per_device = math.ceil(block / n_devices)
    # Padding repeats the block's first member; its results are dropped.
    padded = np.concatenate(
        [members, np.full(per_device * n_devices - members.size, members[0])]
    )
    # Member padded[k] goes to device k mod n: the queue is device-major.
    order = np.arange(padded.size).reshape(per_device, n_devices).T.ravel()
    queue = jax.tree.map(lambda x: x[padded[order]], queue)
    state, timing, _ = _run.solve(
        problem,
        controls,
        queue,
        data,
        n_slots=n_slots,
        matmul_precision=opts.matmul_precision,
        mesh=mesh,
        n_devices=None if mesh is None else n_devices,
    )
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    keep = position[: members.size]
    out = jax.tree.map(lambda x: x[keep], jax.device_get(state.out))
    return out, state, timing


def _gather(out, counts, share_size: int, batch: int):
    """Every process's members, in member order (processes hold consecutive shares
    of at most one member's difference in size)."""
    size = math.ceil(batch / jax.process_count())
    padded = jax.tree.map(
        lambda x: np.concatenate([x, np.repeat(x[:1], size - share_size, 0)]), out
    )
    sizes = multihost_utils.process_allgather(np.asarray(share_size))
    gathered = multihost_utils.process_allgather(padded)
    out = jax.tree.map(
        lambda x: np.concatenate([x[p, : int(n)] for p, n in enumerate(sizes)]),
        gathered,
    )
    counts = {
        k: int(np.sum(multihost_utils.process_allgather(np.asarray(v))))
        for k, v in counts.items()
    }
    return out, counts


def _local_devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    devices = jax.local_devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("`devices` is empty: give at least one device.")
    return devices


def _small(one, data) -> bool:
    """Whether a member's parameters and the data hold at most `_SMALL_MEMBER`
    numbers."""
    leaves = jax.tree.leaves((one, data))
    return sum(x.size for x in leaves if hasattr(x, "size")) <= _SMALL_MEMBER


def _width(lanes: int, one, data) -> int:
    """How many of a device's `lanes` the loops that serve some lanes take at a
    time."""
    width = max(1, lanes // _MEMBERS_PER_LANE)
    if _small(one, data):
        width = max(width, min(lanes, _SMALL_MEMBER_WIDTH))
    return width


def _sizes(lanes, budget, one, data, opts: Options, members: int, n_devices: int):
    """The number of lanes (a multiple of the device count) and of members whose
    outputs are kept on the devices at once."""
    if (
        isinstance(budget, bool)
        or not isinstance(budget, int | np.integer)
        or (budget <= 0)
    ):
        raise ValueError(f"`memory_budget` must be a positive int; got {budget!r}.")
    itemsize = max(x.dtype.itemsize for x in jax.tree.leaves(one))
    params = sum(x.size for x in jax.tree.leaves(one))
    # A lane: its state, the solver's stages and dense output, a row being written.
    lane_bytes = itemsize * params * 24
    n_times, n_slots = len(opts.saves.ts), int(opts.saves.params_at.sum())
    member_bytes = itemsize * (2 * params * n_slots + 4 * n_times) + 64
    if lane_bytes + member_bytes > budget:
        raise ValueError(
            f"`memory_budget` = {budget} bytes is too small for one lane: a member "
            f"of {params} parameters needs about {lane_bytes + member_bytes} bytes "
            "(its solver state and its saved rows). Raise memory_budget, or save "
            "less (save='final', params_at='final', fewer save times)."
        )
    if lanes is None:
        per_lane = _SMALL_MEMBERS_PER_LANE if _small(one, data) else _MEMBERS_PER_LANE
        fits = budget // (2 * (lane_bytes + member_bytes))
        lanes = min(
            max(1, math.ceil(members / per_lane)),
            _MAX_LANES_PER_DEVICE * n_devices,
            fits,
        )
    else:
        check_int("lanes", lanes, 1)
        if lanes * (lane_bytes + member_bytes) > budget:
            raise ValueError(
                f"`lanes` = {lanes} do not fit in memory_budget = {budget} bytes "
                f"(about {lane_bytes + member_bytes} bytes each): lower lanes or "
                "raise memory_budget."
            )
    lanes = n_devices * math.ceil(lanes / n_devices)
    block = (budget - lanes * lane_bytes) // member_bytes
    block = max(lanes, min(members, block))
    return lanes, n_devices * math.ceil(block / n_devices)
