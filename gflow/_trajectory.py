"""The Trajectory: a flow (or a discrete run) sampled at its save times."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._results import SUCCESS_RESULTS
from ._tree import structure_from_json, structure_to_json

_FORMAT_VERSION = 2


class Trajectory(eqx.Module):
    """Parameters, loss and metrics of a run, saved at times `ts`.

    `ts`, `loss`, `grad_norm` and `metrics` have a leading time axis of length
    `T = len(ts)`. Parameters and velocities are kept at the rows `param_rows`:
    every row by default, fewer with `params_at=` (for large models); the last row
    always holds them (`final`). Only valid rows are kept: when a run stops early
    (an event, a failure with `throw=False`) the trajectory ends at the time it
    reached.

    An ensemble (`gflow.simulate_ensemble`) is a *batched* Trajectory: every array
    has leading axes `(batch, time)`, `result` is an array of strings and `stats`
    holds per-member arrays; `traj.member(i)` is member `i` as an ordinary
    Trajectory. A member that ended early repeats its last row (and its final
    parameters) after its end.

    Attributes:
        ts: `(T,)` save times; `ts[0] == 0`, and `ts[-1] == t_max` unless the run
            stopped early.
        params: the parameter pytree, each leaf with a leading axis of length
            `len(param_rows)` (`T` unless `params_at=` kept fewer).
        velocity: dθ/dt at the same rows (`-∇L(θ)` for the gradient flow), same
            structure as `params` (used by `at` for cubic Hermite interpolation).
        loss: `(T,)` loss at the saved states.
        grad_norm: `(T,)` Euclidean norm of the gradient at the saved states.
        metrics: `{name: values}`, each value with a leading axis of length `T`.
        result: why the run ended: `"successful"`, `"stopped_at_loss"`,
            `"stopped_at_grad_norm"`, `"stopped_by_condition"`,
            `"max_steps_reached"`, `"diverged"`, `"dt_min_reached"` or
            `"solver_failed"`.
        stats: counters and timings (`num_steps`, `num_accepted_steps`,
            `num_rejected_steps`, `num_grad_evals`, `wall_time_s`,
            `compile_time_s`, ...).
        meta: how it was made (gflow version, solver, tolerances, seed, dtype, ...).
        param_rows: the rows (indices into `ts`) whose parameters are kept.
        state: the flow's own variables besides the parameters, by name, kept
            at the same rows as `params` (`{}` for the gradient flow; `"u"`, the
            velocity, for `gflow.flows.HeavyBall`).

    Examples:
        >>> traj = gflow.simulate(loss, None, 10.0, params0={"w": jnp.ones(3)})
        >>> traj.final["w"], traj.loss[-1]
        >>> traj.at(2.5)          # parameters at t = 2.5
        >>> traj[10:]             # the saves from index 10 on
        >>> traj.save("run.npz"); gflow.Trajectory.load("run.npz")
    """

    ts: jax.Array
    params: Any
    velocity: Any
    loss: jax.Array
    grad_norm: jax.Array
    metrics: dict[str, Any]
    result: str
    stats: dict[str, Any]
    meta: dict[str, Any]
    param_rows: np.ndarray
    state: dict[str, Any] = eqx.field(default_factory=dict)

    @property
    def batch_size(self) -> int | None:
        """The number of members of an ensemble; None for a single run."""
        return int(self.ts.shape[0]) if self.ts.ndim == 2 else None

    @property
    def final(self) -> Any:
        """The parameters at the last save time (of each member, for an ensemble:
        leading batch axis)."""
        if len(self.param_rows) == 0:
            raise ValueError(
                "this trajectory kept no parameters: the run diverged before its "
                "first kept row (params_at=...)."
            )
        if self.batch_size is None:
            return map_trained(lambda x: x[-1], self.params)
        return map_trained(lambda x: x[:, -1], self.params)

    @property
    def succeeded(self) -> bool | np.ndarray:
        """Whether the run reached `t_max` or a stop it was asked for (a boolean
        array with one entry per member, for an ensemble)."""
        if self.batch_size is None:
            return self.result in SUCCESS_RESULTS
        return np.isin(self.result, SUCCESS_RESULTS)

    def __len__(self) -> int:
        """The number of save rows (per member, for an ensemble)."""
        return int(self.ts.shape[-1])

    def member(self, i: int) -> Trajectory:
        """Member `i` of an ensemble as an ordinary Trajectory: its own rows only
        (the padding after its end is dropped), its result and its counters."""
        batch = self.batch_size
        if batch is None:
            raise TypeError("`member` is for ensembles (gflow.simulate_ensemble).")
        if not isinstance(i, int | np.integer) or not -batch <= i < batch:
            raise IndexError(f"member index {i!r} out of range for {batch} members.")
        n = int(self.stats["num_saved"][i])
        # Its parameter rows before its last row, then its last row (final slot).
        slots = np.flatnonzero(self.param_rows < n - 1)
        slots = np.append(slots, len(self.param_rows) - 1)

        def rows(x):
            return x[i, :n]

        def kept(x):
            return x[i, slots]

        per_member = {
            k: np.asarray(v)[i].item()
            for k, v in self.stats.items()
            if np.ndim(v) == 1 and len(v) == batch
        }
        return Trajectory(
            **take_fields(self, rows, kept),
            result=str(self.result[i]),
            stats=per_member,
            meta=dict(self.meta, member=int(i) % batch),
            param_rows=np.append(self.param_rows[slots[:-1]], n - 1),
        )

    def __getitem__(self, index: slice | Any) -> Trajectory:
        """The trajectory restricted to some save indices (a slice or index array);
        the parameters kept at those rows come along."""
        if self.batch_size is not None:
            raise TypeError(
                "this is an ensemble: take a member with traj.member(i), or index "
                "its arrays directly (traj.loss[:, -1] is every member's final loss)."
            )
        if isinstance(index, int | np.integer):
            raise TypeError(
                "index a Trajectory with a slice (traj[i:i+1]) or an index array; "
                "for the parameters at one save use jax.tree.map(lambda x: x[i], "
                "traj.params)."
            )
        rows = np.arange(len(self))[index]
        slots = np.flatnonzero(np.isin(self.param_rows, rows))
        new_rows = (
            np.searchsorted(rows, self.param_rows[slots])
            if (np.all(np.diff(rows) > 0))
            else np.array(
                [int(np.flatnonzero(rows == r)[0]) for r in self.param_rows[slots]],
                dtype=np.int64,
            )
        )

        fields = take_fields(self, lambda x: x[rows], lambda x: x[slots])
        return Trajectory(
            **fields,
            result=self.result,
            stats=self.stats,
            meta=self.meta,
            param_rows=new_rows,
        )

    def at(self, t: Any) -> Any:
        """Parameters at any time(s) `t` between the first and last kept parameters.

        Interpolated between the two neighbouring rows that hold parameters with a
        cubic Hermite polynomial that matches the saved states and their velocities
        dθ/dt: third order in the gap between saves, and exact at the save times. It
        is an interpolation of the saved states, not the solver's dense output: save
        more densely (`n_save`, `ts`) where you need more accuracy in between.

        Args:
            t: a time, or an array of times (the result then has their shape as
                leading axes).

        Returns:
            A parameter pytree like `final`.

        Raises:
            ValueError: `t` outside the rows that hold parameters (with
                `params_at="final"` only the final time).
        """
        if self.batch_size is not None:
            raise TypeError("this is an ensemble: use traj.member(i).at(t).")
        ts = self.ts[self.param_rows]
        t = jnp.asarray(t, dtype=self.ts.dtype)
        if not isinstance(t, jax.core.Tracer):
            if len(ts) == 0:
                raise ValueError("this trajectory kept no parameters to interpolate.")
            lo, hi = float(ts[0]), float(ts[-1])
            if np.any(np.asarray(t) < lo) or np.any(np.asarray(t) > hi):
                kept = ""
                if len(ts) != len(self):
                    kept = (
                        f" (parameters are kept at {len(ts)} of {len(self)} save "
                        "times: params_at=...; simulate with params_at='all' or the "
                        "times you need)"
                    )
                raise ValueError(
                    f"`t` must lie within the saved times that hold parameters "
                    f"[{lo}, {hi}]{kept}; got {t}."
                )
        if len(ts) == 1:
            return map_trained(
                lambda y: jnp.broadcast_to(y[0], t.shape + y.shape[1:]), self.params
            )
        i = jnp.clip(jnp.searchsorted(ts, t, side="right") - 1, 0, len(ts) - 2)
        h = ts[i + 1] - ts[i]
        s = (t - ts[i]) / h
        h00 = 2 * s**3 - 3 * s**2 + 1
        h10 = s**3 - 2 * s**2 + s
        h01 = -2 * s**3 + 3 * s**2
        h11 = s**3 - s**2

        def hermite(y, v):
            if not eqx.is_inexact_array(y):  # a leaf held fixed
                return y

            def bc(c):  # broadcast the time-shaped weights against one leaf
                return c.reshape(c.shape + (1,) * (y.ndim - 1)).astype(y.dtype)

            return (
                bc(h00) * y[i]
                + bc(h10 * h) * v[i]
                + bc(h01) * y[i + 1]
                + bc(h11 * h) * v[i + 1]
            )

        return jax.tree.map(hermite, self.params, self.velocity)

    def midpoints(self) -> Trajectory:
        """Gradient descent's midpoint iterates (θ_{k−1} + 2θ_k + θ_{k+1}) / 4 at
        the interior rows, which average out an oscillation of period two (GD at
        the edge of stability flips sign along the top eigenvectors at every
        step): what a central flow (`gflow.flows.CentralFlow`) predicts.

        Needs a run saved at every step with its parameters (e.g.
        `gflow.gradient_descent(..., ts=np.arange(steps + 1) * lr)`). The loss,
        gradient norm, metrics and velocities are averaged with the same weights.

        Examples:
            >>> gd = gflow.gradient_descent(model, data, 100.0, lr=0.1, key=0,
            ...                             ts=np.arange(1001) * 0.1)
            >>> gflow.compare(central, gd.midpoints())
        """
        if self.batch_size is not None:
            raise TypeError("`midpoints` is for single runs; take a member first.")
        ts = np.asarray(self.ts, np.float64)
        steps = np.diff(ts)
        if (
            len(ts) < 3
            or len(self.param_rows) != len(ts)
            or not np.allclose(steps, steps[0], rtol=1e-3)
        ):
            raise ValueError(
                "midpoints need the parameters at every step, equally spaced: run "
                "gradient descent with ts=np.arange(steps + 1) * lr (and "
                "params_at='all')."
            )

        def averaged(x):
            x = np.asarray(x)
            return jnp.asarray((x[:-2] + 2 * x[1:-1] + x[2:]) / 4)

        fields = take_fields(self, averaged, averaged)
        fields["ts"] = self.ts[1:-1]
        return Trajectory(
            **fields,
            result=self.result,
            stats=self.stats,
            meta=dict(self.meta, midpoints=True),
            param_rows=np.arange(len(ts) - 2),
        )

    def summary(self) -> str:
        """A few human-readable lines: time span, loss, solver work, outcome."""
        s = self.stats
        if self.batch_size is None:
            lines = [
                f"Trajectory: {len(self)} saves over t in [{float(self.ts[0]):g}, "
                f"{float(self.ts[-1]):g}], result: {self.result}",
                f"  loss {float(self.loss[0]):.6g} -> {float(self.loss[-1]):.6g}, "
                f"|grad| {float(self.grad_norm[0]):.3g} -> "
                f"{float(self.grad_norm[-1]):.3g}",
            ]
            work = "num_steps" in s and (
                f"{s['num_steps']} steps ({s.get('num_rejected_steps', 0)} "
                f"rejected), {s.get('num_grad_evals')} gradient evaluations"
            )
        else:
            names, counts = np.unique(self.result, return_counts=True)
            final = np.asarray(self.loss[:, -1])
            results = zip(names, counts, strict=True)
            lines = [
                f"Ensemble: {self.batch_size} members, {len(self)} saves each, t_max "
                f"{self.meta.get('t_max', float(np.max(self.ts))):g}; results: "
                + ", ".join(f"{n} {name}" for name, n in results),
                f"  final loss min {final.min():.6g}, median {np.median(final):.6g}"
                f", max {final.max():.6g}",
            ]
            work = "member_steps" in s and (
                f"{s['member_steps']} member steps; the lanes paid for "
                f"{s['lane_steps']} ({s['member_steps'] / max(s['lane_steps'], 1):.0%}"
                " useful)"
            )
        if work:
            lines.append(f"  {self.meta.get('solver', '?')}: {work}")
        if "wall_time_s" in s:
            lines.append(
                f"  wall time {s['wall_time_s']:.3f} s "
                f"(compile {s.get('compile_time_s', 0.0):.3f} s)"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{self.summary()}>"

    def save(self, path: str | os.PathLike) -> None:
        """Write the trajectory to a portable `.npz` file (no pickling).

        Arrays keep their dtypes, so `Trajectory.load` returns an identical
        trajectory. The metadata (gflow version, solver, tolerances, seed, stats,
        result) is stored as JSON inside the file. Parameters that are dicts, lists
        and tuples of arrays are stored with their structure; of other pytrees (an
        equinox Module) only the trained leaves are stored, and `load` takes the
        structure from a template (`like=`). Metrics must be dicts, lists and tuples
        of arrays.
        """
        arrays: dict[str, np.ndarray] = {}
        layout = {}
        for name in ("ts", "loss", "grad_norm", "param_rows"):
            arrays[name] = np.asarray(getattr(self, name))
        trees = {"params": self.params, "velocity": self.velocity}
        trees.update({f"state/{k}": v for k, v in self.state.items()})
        for name, tree in {**trees, "metrics": self.metrics}.items():
            if name != "metrics":
                tree = eqx.filter(tree, eqx.is_inexact_array)
            try:
                layout[name] = structure_to_json(tree)
            except TypeError:
                if name == "metrics":
                    raise
                layout[name] = None  # restored from the template given to `load`
            for i, leaf in enumerate(jax.tree.leaves(tree)):
                arrays[f"{name}/{i}"] = np.asarray(leaf)
        header = {
            "format": _FORMAT_VERSION,
            "layout": layout,
            "result": np.asarray(self.result).tolist(),
            "stats": _jsonable(self.stats),
            "meta": _jsonable(self.meta),
        }
        arrays["__gflow__"] = np.array(json.dumps(header))
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, *, like: Any = None) -> Trajectory:
        """Read a trajectory written by `save`.

        Args:
            path: the file.
            like: for parameters that are not plain dicts, lists and tuples (an
                equinox Module): a template of the same structure (e.g. the model
                it started from), whose fixed leaves are put back.

        Raises:
            ValueError: the file is not a complete gflow trajectory file (another
                kind of file, or one cut short), or its parameters need `like`.

        Examples:
            >>> traj.save("run.npz")
            >>> gflow.Trajectory.load("run.npz", like=mlp)  # an equinox MLP
        """
        name = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "__gflow__" not in npz:
                    raise ValueError(f"{name!r} is not a gflow trajectory file.")
                header = json.loads(str(npz["__gflow__"]))
                fields = {
                    n: _as_array(npz[n])
                    for n in ("ts", "loss", "grad_norm", "param_rows")
                }
                fields["state"] = {}
                for tree, description in header["layout"].items():
                    count = sum(1 for k in npz.files if k.rpartition("/")[0] == tree)
                    leaves = [_as_array(npz[f"{tree}/{i}"]) for i in range(count)]
                    value = (
                        _from_template(name, like, leaves)
                        if description is None
                        else structure_from_json(description, leaves)
                    )
                    if tree.startswith("state/"):
                        fields["state"][tree.removeprefix("state/")] = value
                    else:
                        fields[tree] = value
        except (zipfile.BadZipFile, EOFError, KeyError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(
                f"{name!r} is not a complete gflow trajectory file (it may be "
                f"truncated, or not written by Trajectory.save): {e}"
            ) from e
        except ValueError as e:
            if "gflow trajectory" in str(e):
                raise
            raise ValueError(f"{name!r} is not a gflow trajectory file: {e}") from e
        fields["param_rows"] = np.asarray(fields["param_rows"], dtype=np.int64)
        # An ensemble's per-member results and counters come back as arrays.
        result = header["result"]
        stats = {
            k: np.asarray(v) if isinstance(v, list) else v
            for k, v in header["stats"].items()
        }
        return cls(
            result=np.asarray(result) if isinstance(result, list) else result,
            stats=stats,
            meta=header["meta"],
            **fields,
        )


def _from_template(name: str, like: Any, leaves: list) -> Any:
    """Stored trained leaves put into the structure of `like` (fixed leaves too)."""
    if like is None:
        raise ValueError(
            f"{name!r} holds parameters of a structure that is not plain dicts, lists "
            "and tuples (e.g. an equinox Module): pass a template of that structure, "
            "Trajectory.load(path, like=model)."
        )
    trained, fixed = eqx.partition(like, eqx.is_inexact_array)
    treedef = jax.tree.structure(trained)
    if treedef.num_leaves != len(leaves):
        raise ValueError(
            f"`like` has {treedef.num_leaves} floating-point leaves, but {name!r} "
            f"stores {len(leaves)}: it is not the structure the trajectory was made "
            "of."
        )
    return eqx.combine(jax.tree.unflatten(treedef, leaves), fixed)


def take_fields(source: Any, by_row, by_slot) -> dict[str, Any]:
    """A trajectory's arrays (from `source`: a Trajectory, or anything with the
    same fields, such as the engine's `Outputs`) with `by_row` applied to
    those with a row axis (`ts`, `loss`, `grad_norm`, `metrics`) and `by_slot` to
    those kept at the parameter rows (`params`, `velocity`, `state`)."""
    return dict(
        ts=by_row(source.ts),
        loss=by_row(source.loss),
        grad_norm=by_row(source.grad_norm),
        metrics=jax.tree.map(by_row, source.metrics),
        params=map_trained(by_slot, source.params),
        velocity=map_trained(by_slot, source.velocity),
        state={k: map_trained(by_slot, v) for k, v in source.state.items()},
    )


def map_trained(fn, tree: Any) -> Any:
    """`fn` on the trained leaves of a parameter pytree (floating-point arrays, with
    the leading time or batch axes); the leaves held fixed are left as they are."""
    return jax.tree.map(lambda x: fn(x) if eqx.is_inexact_array(x) else x, tree)


def _as_array(array: np.ndarray) -> jax.Array | np.ndarray:
    """A JAX array, unless JAX would change its dtype (float64 without x64 enabled):
    then the NumPy array itself, so that loading never loses precision."""
    converted = jnp.asarray(array)
    return converted if converted.dtype == array.dtype else array


def _jsonable(mapping: dict[str, Any]) -> dict[str, Any]:
    """Plain Python numbers and strings, for JSON."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, np.generic | jax.Array | np.ndarray):
            value = np.asarray(value).tolist()
        out[key] = value
    return out
