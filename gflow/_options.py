"""The options of a call, as small equinox Modules that check themselves when built
(in the spirit of diffrax's `SaveAt` and `PIDController`):

* `SaveTimes`: when to save, and at which of those times to keep the parameters;
* `Stopping`: when to stop before `t_max`;
* `SolverOptions`: the solver, its tolerances, first step and step budget;
* `Checkpointing`: where and how often a long run is written to disk;
* `Options`: all of them, and the metrics (`gflow._engine.Metrics`).

Users pass flat keywords; `gflow._keywords.parse` builds these from them.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import numpy as np

from ._checkpoint import directory
from ._checks import check_int, check_ts, positive_finite, require_positive, warn
from ._engine import Metrics
from ._solvers import is_adaptive
from ._times import save_times
from ._version import gflow_version

MATMUL_PRECISIONS = (None, "highest", "high", "default", "float32", "tensorfloat32")


class SaveTimes(eqx.Module):
    """When a run saves its state.

    Attributes:
        ts: float64 save times, strictly increasing from `ts[0] = 0` to `t_max`.
        params_at: a boolean per save time: whether the parameters (and velocity)
            are kept there. Loss, gradient norm and metrics are kept at every save.
    """

    ts: np.ndarray
    params_at: np.ndarray

    def __check_init__(self):
        if self.params_at.shape != self.ts.shape or not (
            self.params_at[0] and self.params_at[-1]
        ):
            raise ValueError("params must be kept at the first and last save times.")

    @classmethod
    def build(
        cls, t_max, ts, n_save, spacing, params_at, short_ts: bool = False
    ) -> SaveTimes:
        """From the user's keywords (see `KEYWORDS`). `short_ts`: `ts` may end
        before `t_max`, which is then appended (a flow saved at a gradient
        descent's times, `ts=gd.ts`, whose last step falls short of `t_max`)."""
        if ts is None:
            times = save_times(t_max, n_save, spacing)
        else:
            times = check_ts(ts, t_max, short=short_ts)
        return cls(times, _params_rows(params_at, times))

    @property
    def t_max(self) -> float:
        return float(self.ts[-1])

    @property
    def param_rows(self) -> np.ndarray:
        """Indices of the save times whose parameters are kept."""
        return np.flatnonzero(self.params_at)

    @property
    def slots(self) -> np.ndarray:
        """The parameter slot of each save row: its index among the rows that keep
        parameters, or the number of such rows (past the end) for a row that
        keeps none."""
        kept = self.params_at
        return np.where(kept, np.cumsum(kept) - 1, kept.sum()).astype(np.int32)


def _params_rows(params_at: Any, ts: np.ndarray) -> np.ndarray:
    """`params_at` ("all", "final" or times among the save times) as a row mask.
    The first and last rows always hold parameters: a run cut short (diverged)
    then still ends at a row whose parameters are known."""
    ends = np.isin(np.arange(ts.size), (0, ts.size - 1))
    if isinstance(params_at, str):
        if params_at == "all":
            return np.ones(ts.shape, bool)
        if params_at == "final":
            return ends
        raise ValueError(
            f"`params_at` must be 'all', 'final' or an array of save times; got "
            f"{params_at!r}."
        )
    times = np.asarray(params_at)
    if times.ndim != 1 or times.size == 0 or not np.issubdtype(times.dtype, np.number):
        raise ValueError(
            "`params_at` must be 'all', 'final' or a 1-D array of save times; got "
            f"{params_at!r}."
        )
    if np.any(np.diff(times) <= 0):
        raise ValueError("`params_at` times must be strictly increasing.")
    rows = np.searchsorted(ts, times)
    found = (rows < ts.size) & np.isclose(
        ts[np.minimum(rows, ts.size - 1)], times, rtol=1e-12, atol=0
    )
    if not found.all():
        missing = times[~found][:3]
        raise ValueError(
            f"`params_at` times {missing.tolist()} are not among the save times; "
            "pass times from `ts` (e.g. traj.ts[::10]) or the save grid you asked for."
        )
    mask = ends.copy()
    mask[rows] = True
    return mask


class Stopping(eqx.Module):
    """When to stop before `t_max` (any that holds first).

    Attributes:
        at_loss: stop where the loss first falls to this value.
        at_grad_norm: stop at the end of the first step where the gradient norm is
            at most this value.
        when: `fn(params, data) -> bool`: stop at the end of the first step where
            it holds.
    """

    at_loss: float | None = None
    at_grad_norm: float | None = None
    when: Callable | None = None

    def __check_init__(self):
        for name, value in (
            ("stop_at_loss", self.at_loss),
            ("stop_at_grad_norm", self.at_grad_norm),
        ):
            if value is not None and not (
                isinstance(value, int | float | np.number | jax.Array)
                and not isinstance(value, bool)
                and math.isfinite(float(value))
            ):
                raise ValueError(
                    f"`{name}` must be a finite number or None; got {value!r}."
                )
        if self.at_grad_norm is not None and self.at_grad_norm <= 0:
            raise ValueError(
                f"`stop_at_grad_norm` must be positive; got {self.at_grad_norm!r}."
            )
        if self.when is not None and not callable(self.when):
            raise TypeError("`stop_when` must be a function fn(params, data) -> bool.")


class SolverOptions(eqx.Module):
    """The solver and its step-size control.

    Attributes:
        solver: a diffrax solver (gflow's own stabilized solvers included).
        rtol: relative tolerance of the adaptive step-size controller.
        atol: absolute tolerance of the adaptive step-size controller.
        dt0: the first step of an adaptive solver (None: chosen automatically);
            the step of a fixed-step solver.
        max_steps: the most solver steps (accepted and rejected) of one run.
    """

    solver: diffrax.AbstractSolver
    rtol: float
    atol: float
    dt0: float | None
    # Not part of the compiled program: the engine reads it from `Controls`.
    max_steps: int

    def __check_init__(self):
        require_positive("rtol", self.rtol)
        require_positive("atol", self.atol)
        if self.dt0 is not None:
            require_positive("dt0", self.dt0)
        if not self.adaptive and self.dt0 is None:
            raise ValueError(
                f"solver {type(self.solver).__name__} has a fixed step size: pass "
                "`dt0=` (for 'euler', the learning rate of the gradient descent it "
                "equals)."
            )
        check_int("max_steps", self.max_steps, 1)

    @property
    def adaptive(self) -> bool:
        return is_adaptive(self.solver)

    def warn_precision(self, dtype) -> None:
        """Warn when the tolerance asks for more than float32 can give."""
        if self.adaptive and self.rtol < 1e-7 and dtype == np.float32:
            warn(
                f"rtol={self.rtol} is below float32 resolution (~1e-7): the solver may "
                "take tiny steps or stall. Enable float64 (jax.config.update("
                "'jax_enable_x64', True) and float64 parameters) or raise rtol."
            )


def matmul_precision_context(matmul_precision: str | None):
    """`jax.default_matmul_precision(...)`, or no change for None."""
    if matmul_precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(matmul_precision)


class Checkpointing(eqx.Module):
    """Where and how often a run writes checkpoints (`folder` None: it does not)."""

    folder: pathlib.Path | None = eqx.field(default=None, static=True)
    every_s: float = eqx.field(default=30.0, static=True)
    every_steps: int | None = eqx.field(default=None, static=True)

    @classmethod
    def build(cls, folder, every_s, every_steps) -> Checkpointing:
        if not positive_finite(every_s):
            raise ValueError(
                "`checkpoint_every` must be a positive number of seconds; got "
                f"{every_s!r}."
            )
        if every_steps is not None:
            every_steps = check_int("checkpoint_steps", every_steps, 1)
        if folder is None:
            return cls()
        return cls(directory(folder), float(every_s), every_steps)


class Options(eqx.Module):
    """Everything an entry point was asked for besides the model, data and start."""

    saves: SaveTimes
    metrics: Metrics
    throw: bool = eqx.field(static=True)
    matmul_precision: str | None = eqx.field(static=True)
    solver: SolverOptions | None = None
    stopping: Stopping = Stopping()
    progress: bool = eqx.field(default=False, static=True)
    checkpointing: Checkpointing = Checkpointing()

    def __check_init__(self):
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"`matmul_precision` must be one of {MATMUL_PRECISIONS}; got "
                f"{self.matmul_precision!r}."
            )

    def meta(self, kind: str, dtype) -> dict[str, Any]:
        """How a run was made, for `Trajectory.meta`."""
        meta = {
            "gflow_version": gflow_version(),
            "kind": kind,
            "dtype": str(np.dtype(dtype)),
            "t_max": self.saves.t_max,
            "matmul_precision": self.matmul_precision,
            "backend": jax.default_backend(),
        }
        if self.solver is not None:
            adaptive = self.solver.adaptive
            meta.update(
                solver=type(self.solver.solver).__name__,
                rtol=float(self.solver.rtol) if adaptive else None,
                atol=float(self.solver.atol) if adaptive else None,
                dt0=None if self.solver.dt0 is None else float(self.solver.dt0),
                max_steps=self.solver.max_steps,
            )
        return meta
