"""simulate_ensemble(): the flows from a batch of initial parameters at once.

A vmapped `diffeqsolve` runs every member until the slowest one is done: members
that have stopped are masked, not free. So members advance in calls of at most
`_STEPS_PER_CALL` steps each; between calls the members that are done (reached
`t_max`, a requested stop such as `stop_at_grad_norm`, or a failure) leave the
batch, which is compacted to a smaller size once that pays for its compile. Every
member keeps its own adaptive steps. Each call solves at most `chunk_size`
members, split across all devices. The loss, velocity and metrics of the saved
states are evaluated once, at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ._compile import CompileTimer
from ._errors import SimulationError
from ._model import check_params, resolve_loss
from ._run import evaluate_saves, matmul_precision_context
from ._simulate import RESULT_NAMES, _Config, flow_meta, integrate_flow, make_config
from ._solvers import grad_evals_per_step, initial_grad_evals, resolve_solver
from ._times import check_t_max, resolve_save_times
from ._trajectory import SUCCESS_RESULTS, Trajectory

# Steps per call: small enough that members that finish early stop costing work
# soon, large enough that restarting the step-size control costs little.
_STEPS_PER_CALL = 32
# Batch sizes below the chunk are n_devices * 8^k: each size compiles once
# (seconds), so the count of sizes matters as much as the padding.
_BUCKET_FACTOR = 8
_DEFAULT_MEMORY_BUDGET = 2**30
_MEMBER_AXIS = "members"
_PAUSED = RESULT_NAMES.index("max_steps_reached")
_DIVERGED = RESULT_NAMES.index("diverged")


def simulate_ensemble(
    model: Any,
    data: Any,
    t_max: float,
    *,
    params0: Any = None,
    keys: Any = None,
    ts: Any = None,
    n_save: int = 101,
    spacing: Literal["log", "linear"] = "log",
    save: Literal["trajectory", "final"] = "trajectory",
    solver: str | diffrax.AbstractSolver = "tsit5",
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    max_steps: int = 100_000,
    metrics: Mapping[str, Callable[[Any, Any], Any]] | None = None,
    stop_at_loss: float | None = None,
    stop_at_grad_norm: float | None = None,
    stop_when: Callable[[Any, Any], Any] | None = None,
    chunk_size: int | None = None,
    memory_budget: int = _DEFAULT_MEMORY_BUDGET,
    devices: Sequence[jax.Device] | None = None,
    throw: bool = True,
    matmul_precision: str | None = "highest",
) -> Trajectory:
    """The gradient flows from a batch of initial parameters, solved together.

    Each member is its own flow `dθ/dt = -∇L(θ; data)` with its own adaptive step
    sizes and its own stopping, on the same `data` and save times. Members advance
    in calls of at most 32 steps; between calls, the members that are done (reached
    `t_max`, a requested stop such as `stop_at_grad_norm`, or a failure) leave the
    batch, so they stop costing work. The batch shrinks to a smaller size (chunk /
    8^k) once the padding has cost as much time as compiling that size does.
    Members are solved at most `chunk_size` at a time, and each batch is split
    evenly across `devices` (all visible devices of the default backend by default).

    The arguments shared with [`gflow.simulate`][] (`solver`, `rtol`, `atol`, `dt0`,
    `max_steps`, `metrics`, `stop_at_loss`, `stop_at_grad_norm`, `stop_when`,
    `matmul_precision`) mean the same, per member. `max_steps` counts each member's
    steps over all its calls (checked between calls, so a member may exceed it by
    up to 32 steps).

    Args:
        model, data, t_max: as in `gflow.simulate`.
        params0: the initial parameters of all members: a pytree whose leaves all
            have the same leading (batch) axis. See `gflow.grid` for planes.
        keys: instead of `params0`, a batch of PRNG keys for `model.init`: a key
            array of shape `(B,)` (`jax.random.split(key, B)`), or raw uint32 keys
            of shape `(B, 2)`.
        ts, n_save, spacing: the save times, as in `gflow.simulate`.
        save: `"trajectory"` (default) saves every save time; `"final"` saves only
            `t = 0` and where each member ended (its final parameters, loss,
            metrics and stopping time), for large ensembles.
        chunk_size: the most members solved in one call (on all devices together).
            Default: as many as fit in `memory_budget`.
        memory_budget: bytes of device memory one call may use for its members'
            states, stages and saves (default 1 GiB); sets the default chunk size.
        devices: the devices to split each batch across (default: all devices of
            the default backend). For several hosts, start `jax.distributed` first:
            see the "Ensembles" page of the documentation.
        throw: raise `gflow.SimulationError` if any member fails (max_steps,
            divergence, step size collapse); with False, look at `traj.result`.

    Returns:
        A batched [`gflow.Trajectory`][]: every array has leading axes
        `(batch, time)`: `ts` is `(B, T)`, each params leaf `(B, T, ...)`, `loss`
        `(B, T)`. A member that stopped early has fewer saves than `T`; its last
        saved row (its end time and state) is repeated to fill its rows, and
        `stats["num_saved"][i]` says how many rows are its own. `traj.result` is
        an array of strings and `traj.stats` holds per-member arrays
        (`num_steps`, `num_grad_evals`, `num_saved`, `t_end`, ...) and totals
        (`wall_time_s`, `member_steps`, `lane_steps`: the steps the vmapped
        batches paid for, padding and finished-but-masked members included).
        `traj.member(i)` is member `i` as an ordinary Trajectory.

    Raises:
        ValueError, TypeError: bad arguments (the message names the argument).
        SimulationError: a member failed and `throw=True`.

    Example:
        >>> model = gflow.models.MarkovCanonical(0.5, 0.8)
        >>> params0 = gflow.grid({"e": jnp.linspace(-2, 2, 50),
        ...                       "w": jnp.linspace(-2, 2, 50)})
        >>> ens = gflow.simulate_ensemble(model, None, 2000.0, params0=params0,
        ...                               save="final", stop_at_grad_norm=1e-5)
        >>> ens.loss[:, -1]          # each member's final loss, shape (2500,)
    """
    loss_fn = resolve_loss(model)
    t_max = check_t_max(t_max)
    if save not in ("trajectory", "final"):
        raise ValueError(f"`save` must be 'trajectory' or 'final'; got {save!r}.")
    if save == "final":
        if ts is not None:
            raise ValueError("`ts` cannot be combined with save='final'.")
        ts_np = np.array([0.0, t_max])
    else:
        ts_np = resolve_save_times(t_max, ts, n_save, spacing)
    params0 = _initial_batch(model, params0, keys)
    leaves = jax.tree.leaves(params0)
    batch = leaves[0].shape[0]
    dtype = jnp.result_type(*leaves)
    solver_obj = resolve_solver(solver)
    config = make_config(
        solver_obj,
        dtype,
        rtol,
        atol,
        dt0,
        max_steps,
        metrics,
        stop_at_loss,
        stop_at_grad_norm,
        stop_when,
        False,
    )
    mesh = _member_mesh(devices)
    n_devices = 1 if mesh is None else mesh.size
    chunk = _chunk_size(chunk_size, memory_budget, params0, len(ts_np), batch)
    chunk = n_devices * math.ceil(chunk / n_devices)
    steps_per_call = min(_STEPS_PER_CALL, config.max_steps)

    state = _EnsembleState(params0, len(ts_np))
    ts_arr = jnp.asarray(ts_np, dtype=dtype)
    precision = matmul_precision_context(matmul_precision)
    with CompileTimer() as timer, precision:
        sizes = _BatchSizes(
            chunk, n_devices, _program_key(loss_fn, params0, data, config, mesh)
        )
        while state.active.any():
            members = np.flatnonzero(state.active)
            for part, padded in _batches(members, chunk, sizes.choose):
                # Each new batch size compiles, between runs: time every call.
                with CompileTimer() as call:
                    out = jax.device_get(
                        _advance(
                            loss_fn,
                            _take(state.y, padded),
                            jnp.asarray(state.t[padded], dtype),
                            data,
                            ts_arr,
                            config,
                            steps_per_call,
                            mesh,
                        )
                    )
                state.compile_time_s += call.compile_time_s
                sizes.paid(part.size, padded.size, call)
                state.record(part, out, padded.size)
            state.stop_over_budget(config.max_steps)
        state.evaluate(loss_fn, config.metrics, data, chunk, sizes.choose, mesh)

    meta = flow_meta(
        "ensemble", solver_obj, config, rtol, atol, dt0, dtype, t_max, matmul_precision
    )
    meta.update(save=save, batch_size=int(batch), chunk_size=int(chunk),
                num_devices=int(n_devices))  # fmt: skip
    traj = state.trajectory(solver_obj, config, timer, meta)
    failed = ~np.isin(traj.result, SUCCESS_RESULTS)
    if throw and failed.any():
        names, numbers = np.unique(traj.result[failed], return_counts=True)
        detail = ", ".join(
            f"{n} {name}" for name, n in zip(names, numbers, strict=True)
        )
        first = int(np.flatnonzero(failed)[0])
        raise SimulationError(
            f"gflow.simulate_ensemble: {int(failed.sum())} of {batch} members failed "
            f"({detail}); the first is member {first}. Raise max_steps, use float64 "
            "or tighter tolerances, or pass throw=False to get the ensemble and "
            "inspect `traj.result`.",
            traj.result[first],
            traj,
        )
    return traj


def _initial_batch(model: Any, params0: Any, keys: Any) -> Any:
    """The batched initial parameters, checked."""
    if (params0 is None) == (keys is None):
        raise ValueError(
            "pass exactly one of `params0` (initial parameters with a leading batch "
            "axis) and `keys` (a batch of PRNG keys for model.init)."
        )
    if keys is not None:
        init = getattr(model, "init", None)
        if init is None or not callable(init):
            raise ValueError(
                "`keys` needs a model with an `init(key)` method; for a plain loss "
                "function pass the batched initial parameters as `params0=`."
            )
        keys = _check_keys(keys)
        return check_params(jax.vmap(init)(keys), "params0")
    params0 = check_params(params0, "params0")
    sizes = {
        jax.tree_util.keystr(path) or "(the root)": (
            leaf.shape[0] if leaf.ndim else None
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(params0)
    }
    if None in sizes.values():
        where = next(k for k, v in sizes.items() if v is None)
        raise ValueError(
            f"`params0` leaf {where} is a scalar: every leaf needs a leading batch "
            "axis (one entry per member)."
        )
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "`params0` leaves disagree on the batch size (the leading axis): "
            + ", ".join(f"{k}: {v}" for k, v in sizes.items())
        )
    if next(iter(sizes.values())) == 0:
        raise ValueError("`params0` is an empty batch: it has no members.")
    return params0


def _check_keys(keys: Any) -> jax.Array:
    if isinstance(keys, jax.Array) and jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        ok = keys.ndim == 1
    else:
        keys = jnp.asarray(keys)
        ok = keys.dtype == jnp.uint32 and keys.ndim == 2 and keys.shape[1] == 2
    if not ok:
        raise ValueError(
            "`keys` must be a batch of PRNG keys: shape (B,) from "
            f"jax.random.split(key, B), or raw uint32 keys of shape (B, 2); got "
            f"shape {tuple(keys.shape)} and dtype {keys.dtype}."
        )
    if keys.shape[0] == 0:
        raise ValueError("`keys` is an empty batch: it has no members.")
    return keys


def _member_mesh(devices: Sequence[jax.Device] | None) -> Mesh | None:
    """A 1-D mesh over the devices that share the members; None for one device."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("`devices` is empty: give at least one device.")
    if len(devices) == 1:
        return None
    return Mesh(np.asarray(devices), (_MEMBER_AXIS,))


def _chunk_size(
    chunk_size: int | None, budget: int, params0: Any, width: int, batch: int
) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
            raise TypeError(
                f"`chunk_size` must be an int; got {type(chunk_size).__name__}."
            )
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be at least 1; got {chunk_size}.")
        return int(min(chunk_size, batch))
    if not (isinstance(budget, int | np.integer) and budget > 0):
        raise ValueError(f"`memory_budget` must be a positive int; got {budget!r}.")
    member_bytes = sum(leaf[0].nbytes for leaf in jax.tree.leaves(params0))
    # Saved states and velocities, the solver's stages and the call's states.
    per_member = member_bytes * (2 * (width + 1) + 16)
    return int(max(1, min(batch, budget // per_member)))


class _BatchSizes:
    """Which batch size to pad a call to.

    The sizes: the chunk, and below it n_devices * 8^k, a ladder shared by every
    ensemble of the same program in this process. Each new size costs a compile
    (seconds); a size too large costs lanes on every call. So a smaller size is
    compiled only once the calls padded beyond it have cost as much time as a
    compile does (rent until renting has cost the price of buying: never more than
    twice the best choice in hindsight). What was compiled, and the rent paid, are
    remembered across calls that run the same program.
    """

    def __init__(self, chunk: int, n_devices: int, program=None):
        self.chunk, self.n_devices = chunk, n_devices
        self.memory = _ProgramMemory() if program is None else _COMPILED.setdefault(
            program, _ProgramMemory()
        )  # fmt: skip

    def ideal(self, n: int) -> int:
        size = self.n_devices
        while size < n:
            size *= _BUCKET_FACTOR
        return min(size, self.chunk)

    def choose(self, n: int) -> int:
        ideal, compiled = self.ideal(n), self.memory.compile_s
        fits = [s for s in compiled if n <= s <= self.chunk]
        if ideal in compiled or not fits:
            return ideal
        if self.memory.rent_s >= self._compile_cost():
            self.memory.rent_s = 0.0
            return ideal
        return min(fits)

    def _compile_cost(self) -> float:
        # A size found in JAX's cache records 0 s: estimate from real compiles.
        real = [s for s in self.memory.compile_s.values() if s > 0]
        return max(real, default=_LAST_COMPILE_S[0])

    def paid(self, n: int, size: int, call: CompileTimer) -> None:
        if size not in self.memory.compile_s:
            self.memory.compile_s[size] = call.compile_time_s
            if call.compile_time_s > 0:
                _LAST_COMPILE_S[0] = call.compile_time_s
        elif size > self.ideal(n):
            self.memory.rent_s += call.wall_time_s


class _ProgramMemory:
    def __init__(self):
        self.compile_s: dict[int, float] = {}  # compiled sizes: their compile time
        self.rent_s = 0.0  # time spent in calls padded beyond their ideal size


_COMPILED: dict[Any, _ProgramMemory] = {}
_LAST_COMPILE_S = [1.0]  # the latest compile time measured in this process


def _program_key(loss_fn, params0, data, config, mesh) -> Any:
    """What decides which program `_advance` compiles, besides the batch size; None
    when some part cannot be hashed (then nothing is shared between calls)."""

    def shapes(tree, skip=0):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, tuple(
            (np.shape(x)[skip:], np.dtype(getattr(x, "dtype", type(x)))) for x in leaves
        )

    key = (
        loss_fn,
        shapes(params0, skip=1),  # one member's shapes: any batch size
        shapes(data),
        eqx.partition(config, eqx.is_array)[1],
        mesh,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _batches(members: np.ndarray, chunk: int, choose):
    """Split `members` into calls of at most `chunk`, each padded (repeating its
    first member) to the size `choose(n)` picks."""
    for start in range(0, members.size, chunk):
        part = members[start : start + chunk]
        size = choose(part.size)
        yield part, np.concatenate([part, np.full(size - part.size, part[0])])


def _on_members(fn, batched: tuple, replicated: tuple, mesh: Mesh | None):
    """`fn(*batched, *replicated)` vmapped over the members (the leading axis of
    `batched`), and split across the devices of `mesh`."""

    def members(batched, replicated):
        return jax.vmap(lambda *b: fn(*b, *replicated))(*batched)

    if mesh is None:
        return members(batched, replicated)
    # Traced values must enter shard_map as arguments; static ones stay closed over.
    dynamic, static = eqx.partition(replicated, eqx.is_array)
    # check_vma=False: diffrax's loops mix per-member and replicated values in ways
    # the varying-axis checker rejects; the members' solves are independent anyway.
    return jax.shard_map(
        lambda b, d: members(b, eqx.combine(d, static)),
        mesh=mesh,
        in_specs=(PartitionSpec(_MEMBER_AXIS), PartitionSpec()),
        out_specs=PartitionSpec(_MEMBER_AXIS),
        check_vma=False,
    )(batched, dynamic)


@eqx.filter_jit
def _advance(loss_fn, y0, t0, data, ts, config: _Config, steps: int, mesh):
    """At most `steps` steps of each member's flow from its own time `t0`."""

    def one(y0, t0, data, ts, config):
        # Save times already passed are clipped to t0: saved again, then dropped.
        return integrate_flow(
            loss_fn, y0, data, t0, ts[-1], jnp.maximum(ts, t0), config, steps
        )

    return _on_members(one, (y0, t0), (data, ts, config), mesh)


@eqx.filter_jit
def _evaluate(loss_fn, metrics, params, data, mesh):
    def one(params, data):
        return evaluate_saves(loss_fn, metrics, params, data)

    return _on_members(one, (params,), (data,), mesh)


class _EnsembleState:
    """Host-side bookkeeping between calls: where each member is, what it saved."""

    def __init__(self, params0, n_times):
        self.y = jax.tree.map(np.array, params0)
        batch = jax.tree.leaves(self.y)[0].shape[0]
        self.n_times = n_times
        self.t = np.zeros(batch)  # each member's current time
        self.next_save = np.zeros(batch, np.int64)  # index of its next save time
        self.last_saved_t = np.full(batch, -np.inf)
        self.rows = np.zeros(batch, np.int64)  # rows written
        self.active = np.ones(batch, bool)
        self.code = np.zeros(batch, np.int32)
        self.counters = {
            name: np.zeros(batch, np.int64)
            for name in ("num_steps", "num_accepted_steps", "num_rejected_steps")
        }
        self.calls = np.zeros(batch, np.int64)
        self.lane_steps = 0
        self.n_calls = 0
        self.compile_time_s = 0.0
        self.ts = np.zeros((batch, n_times))
        self.params = jax.tree.map(
            lambda y: np.zeros((batch, n_times) + y.shape[1:], y.dtype), self.y
        )
        self.evaluated = None

    def record(self, members: np.ndarray, out: dict, size: int) -> None:
        """Store what a call did for `members` (the first `members.size` of its
        padded batch of `size`), and pause or retire each of them."""
        n = members.size
        out = jax.tree.map(lambda x: x[:n], out)
        steps = out["stats"]["num_steps"]
        self.lane_steps += size * int(steps.max(initial=0))
        self.n_calls += 1
        for name, counter in self.counters.items():
            counter[members] += out["stats"][name]
        self.calls[members] += 1

        ts = out["ts"]
        rows = np.arange(n)
        j = np.arange(ts.shape[1])[None, :]
        reached = np.isfinite(ts).sum(axis=1) - 1  # save entries before the end row
        start = self.next_save[members]
        code = out["outcome"]
        paused = code == _PAUSED
        end_t = ts[rows, reached]
        last_t = np.where(
            reached > start,
            ts[rows, np.maximum(reached - 1, 0)],
            self.last_saved_t[members],
        )
        # A member that stopped between save times keeps the state where it stopped.
        end_row = ~paused & (code != 0) & (end_t > last_t)
        keep = ((j >= start[:, None]) & (j < reached[:, None])) | (
            end_row[:, None] & (j == reached[:, None])
        )
        # A trajectory never presents inf/NaN states: cut a member at its first one.
        bad = keep & ~_rows_finite(out["params"])
        diverged = bad.any(axis=1)
        keep &= j < np.where(diverged, np.argmax(bad, axis=1), ts.shape[1])[:, None]
        code = np.where(diverged, _DIVERGED, code)

        src_b, src_j = np.nonzero(keep)
        dst_b = members[src_b]
        dst_row = self.rows[dst_b] + (np.cumsum(keep, axis=1) - 1)[src_b, src_j]
        self.ts[dst_b, dst_row] = ts[src_b, src_j]
        jax.tree.map(
            lambda buf, x: buf.__setitem__((dst_b, dst_row), x[src_b, src_j]),
            self.params,
            out["params"],
        )
        self.rows[members] += keep.sum(axis=1)
        kept_any = keep.any(axis=1)
        last_kept = ts.shape[1] - 1 - np.argmax(keep[:, ::-1], axis=1)
        self.last_saved_t[members] = np.where(
            kept_any, ts[rows, last_kept], self.last_saved_t[members]
        )
        self.next_save[members] = np.maximum(start, reached)
        self.t[members] = end_t

        go_on = paused & ~diverged
        self.code[members] = np.where(go_on, 0, code)
        self.active[members[~go_on]] = False
        jax.tree.map(
            lambda y, p: y.__setitem__(members[go_on], p[go_on, reached[go_on]]),
            self.y,
            out["params"],
        )

    def stop_over_budget(self, max_steps: int) -> None:
        over = self.active & (self.counters["num_steps"] >= max_steps)
        self.code[over] = _PAUSED
        self.active[over] = False

    def evaluate(self, loss_fn, metrics, data, chunk, choose, mesh) -> None:
        """Loss, velocity and metrics of every saved row, once, `chunk` members at
        a time. Rows past a member's end repeat its last row first."""
        batch = self.active.size
        self.ts, self.params = self._fill_past_end((self.ts, self.params))
        parts = []
        for part, padded in _batches(np.arange(batch), chunk, choose):
            params = _take(self.params, padded)
            with CompileTimer() as call:
                out = jax.device_get(_evaluate(loss_fn, metrics, params, data, mesh))
            self.compile_time_s += call.compile_time_s
            parts.append(_take(out, np.arange(part.size)))
        self.evaluated = jax.tree.map(lambda *x: np.concatenate(x), *parts)
        # A finite state can still have an inf/NaN loss: the member diverged there.
        bad = ~np.isfinite(self.evaluated["loss"])
        for i in np.flatnonzero(bad.any(axis=1) & (bad.argmax(axis=1) < self.rows)):
            self.rows[i] = bad[i].argmax()
            self.code[i] = _DIVERGED

    def _fill_past_end(self, tree):
        """Each member's rows past its end replaced by its last row."""
        rows = np.arange(self.n_times)[None, :]
        source = np.minimum(rows, np.maximum(self.rows, 1)[:, None] - 1)
        members = np.arange(self.active.size)[:, None]
        return jax.tree.map(lambda x: x[members, source], tree)

    def trajectory(self, solver, config, timer, meta) -> Trajectory:
        per_step = grad_evals_per_step(solver)
        steps = self.counters["num_steps"]
        stats = dict(self.counters)
        if per_step is None:
            stats["num_grad_evals"] = None
        else:
            # Each call restarts the solver (one first stage for FSAL methods), and
            # checks the gradient norm once more than it steps; every save row is
            # evaluated once at the end.
            stats["num_grad_evals"] = (
                per_step * steps
                + initial_grad_evals(solver) * self.calls
                + self.n_times
                + (steps + self.calls if config.stop_at_grad_norm is not None else 0)
            )
        stats.update(
            num_saved=self.rows.copy(),
            t_end=self.ts[np.arange(self.active.size), np.maximum(self.rows, 1) - 1],
            member_steps=int(steps.sum()),
            lane_steps=int(self.lane_steps),
            num_calls=self.n_calls,
            wall_time_s=timer.wall_time_s,
            compile_time_s=self.compile_time_s,
            run_time_s=timer.wall_time_s - self.compile_time_s,
            compiled=timer.num_compilations > 0,
        )
        ts, params, evaluated = self._fill_past_end(
            (self.ts, self.params, self.evaluated)
        )
        return Trajectory(
            ts=ts.astype(evaluated["loss"].dtype),
            params=params,
            result=np.asarray(RESULT_NAMES)[self.code],
            stats=stats,
            meta=meta,
            **evaluated,
        )


def _take(tree, index: np.ndarray):
    """The members `index` of every leaf (leading axis)."""
    return jax.tree.map(lambda x: x[index], tree)


def _rows_finite(params) -> np.ndarray:
    """(members, rows): whether every parameter of a saved row is finite."""
    checks = [
        np.isfinite(leaf).reshape(leaf.shape[:2] + (-1,)).all(axis=2)
        for leaf in jax.tree.leaves(params)
    ]
    return np.logical_and.reduce(checks)
