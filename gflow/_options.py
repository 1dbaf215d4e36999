"""The options the entry points share, each validated in exactly one place.

Users pass flat keywords (`rtol=1e-8`, `stop_at_loss=0.1`, ...). `parse` turns them
into small equinox Modules that check themselves when built, in the spirit of
diffrax's `SaveAt` and `PIDController`:

* `SaveTimes`: when to save, and at which of those times to keep the parameters;
* `Stopping`: when to stop before `t_max`;
* `SolverOptions`: the solver, its tolerances, first step and step budget;
* `Metrics`: what to evaluate on every saved state.

Every keyword has its default and its documentation here, once: `takes_options`
gives an entry point its signature and the "Keyword Args" part of its docstring.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import pathlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import diffrax
import equinox as eqx
import jax
import numpy as np

from ._solvers import is_adaptive, resolve_solver
from ._times import check_t_max, save_times

MATMUL_PRECISIONS = (None, "highest", "high", "default", "float32", "tensorfloat32")


def positive_finite(x: Any) -> bool:
    """Whether `x` is a positive finite real number (False for anything else)."""
    if isinstance(x, bool | str):
        return False
    try:
        return math.isfinite(float(x)) and float(x) > 0
    except (TypeError, ValueError):
        return False


def require_positive(name: str, value: Any) -> None:
    """A ValueError naming `name` unless `value` is a positive finite number."""
    if not positive_finite(value):
        raise ValueError(f"`{name}` must be a positive finite number; got {value!r}.")


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
    def build(cls, t_max, ts, n_save, spacing, params_at) -> SaveTimes:
        """From the user's keywords (see `KEYWORDS`)."""
        if ts is None:
            times = save_times(t_max, n_save, spacing)
        else:
            times = check_ts(ts, t_max)
        return cls(times, _params_rows(params_at, times))

    @property
    def t_max(self) -> float:
        return float(self.ts[-1])

    @property
    def param_rows(self) -> np.ndarray:
        """Indices of the save times whose parameters are kept."""
        return np.flatnonzero(self.params_at)


def check_ts(ts: Any, t_max: float) -> np.ndarray:
    """User-given save times, checked against `t_max`; float64."""
    array = np.asarray(ts)
    if array.ndim != 1:
        raise ValueError(f"`ts` must be a 1-D array of times; got shape {array.shape}.")
    if array.size < 2:
        raise ValueError("`ts` needs at least two times: 0 and t_max.")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"`ts` must hold real numbers; got dtype {array.dtype}.")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError("`ts` must be finite.")
    if array[0] != 0:
        raise ValueError(
            f"`ts` must start at 0 (the initial parameters); got ts[0] = {array[0]}."
        )
    if np.any(np.diff(array) <= 0):
        i = int(np.argmax(np.diff(array) <= 0))
        raise ValueError(
            "`ts` must be strictly increasing; "
            f"ts[{i}] = {array[i]} is followed by ts[{i + 1}] = {array[i + 1]}."
        )
    if not math.isclose(array[-1], t_max, rel_tol=1e-12):
        raise ValueError(
            f"`ts` must end at t_max = {t_max}; got ts[-1] = {array[-1]}. Pass "
            "t_max=ts[-1], or append t_max to ts."
        )
    array[-1] = t_max
    return array


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
    max_steps: int = eqx.field(static=True)

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
            warnings.warn(
                f"rtol={self.rtol} is below float32 resolution (~1e-7): the solver may "
                "take tiny steps or stall. Enable float64 (jax.config.update("
                "'jax_enable_x64', True) and float64 parameters) or raise rtol.",
                stacklevel=4,
            )


def check_batch_size(batch_size: Any, examples: int | None = None) -> int:
    """`batch_size` as an int of at least 1 and at most `examples` (when known),
    or a ValueError naming it."""
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int | np.integer)
        or batch_size < 1
    ):
        raise ValueError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
    if examples is not None and batch_size > examples:
        raise ValueError(
            f"`batch_size` = {batch_size} is larger than the data's {examples} "
            "examples."
        )
    return int(batch_size)


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int of at least `minimum`, or an error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an int; got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum}; got {value}.")
    return int(value)


class Metrics(eqx.Module):
    """`{name: fn(params, data)}` evaluated on every saved state.

    Attributes:
        fns: the metrics as a tuple of `(name, fn)` pairs (hashable: part of the
            compiled program's identity).
    """

    fns: tuple[tuple[str, Callable], ...]

    @classmethod
    def build(cls, metrics: Mapping[str, Callable] | None) -> Metrics:
        metrics = {} if metrics is None else metrics
        if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and callable(f) for k, f in metrics.items()
        ):
            raise TypeError(
                "`metrics` must be a dict {name: fn(params, data)} with string names "
                "and callable values."
            )
        return cls(tuple(metrics.items()))

    def __call__(self, params: Any, data: Any) -> dict[str, Any]:
        values = {}
        for name, fn in self.fns:
            try:
                values[name] = fn(params, data)
            except Exception as e:  # noqa: BLE001 - re-raised naming the metric
                raise ValueError(
                    f"metric {name!r} failed on the parameters: {type(e).__name__}: {e}"
                ) from e
        return values


def matmul_precision_context(matmul_precision: str | None):
    """`jax.default_matmul_precision(...)`, or no change for None."""
    if matmul_precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(matmul_precision)


# --- The keywords -------------------------------------------------------------------


@dataclass(frozen=True)
class Keyword:
    """One flat keyword: its default, its type (as written) and its documentation."""

    default: Any
    type: str
    doc: str


KEYWORDS: dict[str, Keyword] = {
    "ts": Keyword(
        None,
        "ArrayLike | None",
        "explicit save times: a strictly increasing 1-D array from 0 to `t_max`.",
    ),
    "n_save": Keyword(101, "int", "the number of save times when `ts` is not given."),
    "spacing": Keyword(
        "log",
        'Literal["log", "linear"]',
        '`"log"`: 0, then geometrically spaced from `t_max * 1e-4` to `t_max` '
        '(see `gflow.save_times`); or `"linear"`.',
    ),
    "params_at": Keyword(
        "all",
        'Literal["all", "final"] | ArrayLike',
        'where to keep the parameters and velocities: `"all"` save times, '
        '`"final"` (and t = 0), or an increasing array of save times (t = 0 and '
        "the end are always kept). Loss, gradient norm and metrics are kept at "
        "every save time; this bounds the memory of large models.",
    ),
    "solver": Keyword(
        "auto",
        "str | diffrax.AbstractSolver",
        'a name in `gflow.SOLVERS` or any diffrax solver instance. `"auto"`: Tsit5 '
        "while the flow is not stiff, the stabilized RKC2 while it is (stiffness "
        "is read off Tsit5's stages at no cost; it falls back to Tsit5, with a "
        "warning, for a loss without forward-mode derivatives). Explicit: "
        '`"tsit5"`, `"dopri5"`, `"dopri8"`, `"bosh3"`, `"heun"`. Stabilized, for '
        'stiff flows (they use Hessian-vector products): `"rkc2"`, `"rock4"`. '
        '`"euler"`: fixed step `dt0`, exactly gradient descent with learning rate '
        '`dt0`. `"kvaerno5"`: implicit, dense Jacobian, small models only.',
    ),
    "rtol": Keyword(
        1e-6, "float", "relative tolerance of the adaptive step-size control."
    ),
    "atol": Keyword(
        1e-8, "float", "absolute tolerance of the adaptive step-size control."
    ),
    "dt0": Keyword(
        None,
        "float | None",
        "the first step of an adaptive solver (default: chosen automatically); the "
        'step of a fixed-step solver such as `"euler"` (required there).',
    ),
    "max_steps": Keyword(
        100_000, "int", "the most solver steps (accepted and rejected) of one flow."
    ),
    "metrics": Keyword(
        None,
        "Mapping[str, Callable] | None",
        "`{name: fn(params, data)}`, each evaluated on every saved state; results in "
        "`traj.metrics[name]` with a leading time axis. Define the functions once "
        "and reuse them: a new function object recompiles.",
    ),
    "stop_at_loss": Keyword(
        None,
        "float | None",
        "stop where the loss first falls to this value, located to round-off "
        "within the step by a Newton root find on the solver's dense output. Costs "
        "one loss evaluation per step.",
    ),
    "stop_at_grad_norm": Keyword(
        None,
        "float | None",
        "stop at the end of the first step where the gradient norm is at most this "
        "value. Costs one gradient per step (counted in `num_grad_evals`).",
    ),
    "stop_when": Keyword(
        None,
        "Callable | None",
        "`fn(params, data) -> bool`: stop at the end of the first step where it "
        "holds (e.g. a model's `phase_spec.alignment`, to stop at the end of Phase "
        "1).",
    ),
    "throw": Keyword(
        True,
        "bool",
        "raise `gflow.SimulationError` when a run fails (max_steps reached, "
        "divergence to inf/NaN, step size collapse). With False the trajectory up "
        "to the failure is returned and `traj.result` says why.",
    ),
    "matmul_precision": Keyword(
        "highest",
        "str | None",
        "the precision of float32 matrix products (`jax.default_matmul_precision`). "
        '`"highest"` computes them in full float32: on GPUs JAX otherwise uses '
        "TF32 (about 1e-3 relative error), whose noise makes the adaptive step "
        "control reject step after step (measured on an H100: 3,890 steps instead "
        "of 93 for the quickstart). None keeps JAX's default. No effect on CPUs.",
    ),
    "progress": Keyword(
        False, "bool", "show a progress bar (tqdm if installed, else text)."
    ),
    "checkpoint": Keyword(
        None,
        "str | os.PathLike | None",
        "a directory for checkpoints (created if missing). The run is cut into "
        "segments and, after each, its whole state is written there atomically with "
        "a fingerprint of the call (options, initial parameters, data, gflow "
        "version; not the code of the loss). Calling again with the same arguments "
        "and directory resumes from the last checkpoint and gives the same result "
        "bit for bit; a finished run's checkpoint returns its result at once; a "
        "checkpoint of a different call is refused.",
    ),
    "checkpoint_every": Keyword(
        30.0, "float", "seconds of run time between checkpoints (about)."
    ),
    "checkpoint_steps": Keyword(
        None,
        "int | None",
        "instead of `checkpoint_every`: a checkpoint every this many steps "
        "(gradient descent checkpoints at save times, after whole intervals between "
        "them).",
    ),
}

#: The keywords of each kind of entry point.
SAVE_KEYWORDS = ("ts", "n_save", "spacing", "params_at")
COMMON_KEYWORDS = (*SAVE_KEYWORDS, "metrics", "throw", "matmul_precision")
SOLVER_KEYWORDS = ("solver", "rtol", "atol", "dt0", "max_steps")
STOP_KEYWORDS = ("stop_at_loss", "stop_at_grad_norm", "stop_when")
FLOW_KEYWORDS = (*COMMON_KEYWORDS, *SOLVER_KEYWORDS, *STOP_KEYWORDS)
CHECKPOINT_KEYWORDS = ("checkpoint", "checkpoint_every", "checkpoint_steps")


class Checkpointing(eqx.Module):
    """Where and how often a run writes checkpoints (`folder` None: it does not)."""

    folder: pathlib.Path | None = eqx.field(default=None, static=True)
    every_s: float = eqx.field(default=30.0, static=True)
    every_steps: int | None = eqx.field(default=None, static=True)

    @classmethod
    def build(cls, folder, every_s, every_steps) -> Checkpointing:
        from ._checkpoint import directory

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
        from ._run import gflow_version

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


def parse(entry: str, t_max: Any, allowed: tuple[str, ...], given: dict) -> Options:
    """The options of a call from its flat keywords; a TypeError for unknown ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise TypeError(
            f"gflow.{entry}() got an unexpected keyword argument `{name}`.{hint}"
        )
    kw = {name: given.get(name, KEYWORDS[name].default) for name in allowed}
    t_max = check_t_max(t_max)
    saves = SaveTimes.build(
        t_max, kw["ts"], kw["n_save"], kw["spacing"], kw["params_at"]
    )
    solver = stopping = None
    if "solver" in allowed:
        solver = SolverOptions(
            resolve_solver(kw["solver"]), kw["rtol"], kw["atol"], kw["dt0"],
            kw["max_steps"],
        )  # fmt: skip
    if "stop_at_loss" in allowed:
        stopping = Stopping(
            kw["stop_at_loss"], kw["stop_at_grad_norm"], kw["stop_when"]
        )
    return Options(
        saves=saves,
        metrics=Metrics.build(kw["metrics"]),
        throw=bool(kw["throw"]),
        matmul_precision=kw["matmul_precision"],
        solver=solver,
        stopping=Stopping() if stopping is None else stopping,
        progress=bool(kw.get("progress", False)),
        checkpointing=Checkpointing.build(
            *(kw.get(k, KEYWORDS[k].default) for k in CHECKPOINT_KEYWORDS)
        ),
    )


def takes_options(*keywords: str):
    """Give an entry point `fn(..., **options)` the signature and the documentation
    of the flat keywords it takes, from `KEYWORDS` (so they exist once).

    The docstring's `{keyword_args}` marker is replaced by a "Keyword Args" section.
    """

    def decorate(fn):
        signature = inspect.signature(fn)
        params = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
        params += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                              default=KEYWORDS[name].default,
                              annotation=KEYWORDS[name].type)
            for name in keywords
        ]  # fmt: skip
        fn.__signature__ = signature.replace(parameters=params)
        fn.__gflow_keywords__ = keywords
        lines = ["Keyword Args:"]
        for name in keywords:
            keyword = KEYWORDS[name]
            lines.append(f"    {name}: {keyword.doc} Default: `{keyword.default!r}`.")
        fn.__doc__ = fn.__doc__.replace(
            "{keyword_args}", "\n".join(lines).replace("\n", "\n    ")
        )
        return fn

    return decorate
