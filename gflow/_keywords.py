"""The flat keywords of the entry points: each one's default, type and
documentation, once (`KEYWORDS`); `parse` turns a call's keywords into `Options`,
and `takes_options` gives an entry point its signature and the "Keyword Args" part
of its docstring from the same table."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any

from ._checks import check_t_max
from ._engine import Metrics
from ._options import (
    Checkpointing,
    Options,
    SaveTimes,
    SolverOptions,
    Stopping,
)
from ._solvers import resolve_solver


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
        "explicit save times: a strictly increasing 1-D array from 0 to `t_max` (a "
        "flow's may end before `t_max`, which is then appended: `ts=gd.ts` works "
        "whatever the learning rate).",
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
        "and reuse them: a new function object recompiles. A metric that carries "
        "a warm start from row to row (`gflow.metrics.AbstractCarriedMetric`, "
        "e.g. `gflow.metrics.Sharpness(loss)`) goes here too.",
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
        False,
        "bool",
        "report progress on stderr as plain text: `compiling...` while the program "
        "compiles, then t, the loss at the last save, the steps and the solver's "
        "method, between segments of the run (about twice a second). The compiled "
        "program is the same as without, so the compilation cache serves both.",
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
        "instead of `checkpoint_every`: a checkpoint every this many steps.",
    ),
}

# Words of an optimiser a user may pass to a flow, which has none of them.
_OPTIMISER_WORDS = {"lr", "learning_rate", "momentum", "batch_size", "optimizer"}

#: The keywords of each kind of entry point.
SAVE_KEYWORDS = ("ts", "n_save", "spacing", "params_at")
COMMON_KEYWORDS = (*SAVE_KEYWORDS, "metrics", "throw", "matmul_precision")
SOLVER_KEYWORDS = ("solver", "rtol", "atol", "dt0", "max_steps")
STOP_KEYWORDS = ("stop_at_loss", "stop_at_grad_norm", "stop_when")
FLOW_KEYWORDS = (*COMMON_KEYWORDS, *SOLVER_KEYWORDS, *STOP_KEYWORDS)
CHECKPOINT_KEYWORDS = ("checkpoint", "checkpoint_every", "checkpoint_steps")


def parse(entry: str, t_max: Any, allowed: tuple[str, ...], given: dict) -> Options:
    """The options of a call from its flat keywords; a TypeError for unknown ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        if "solver" in allowed and name in _OPTIMISER_WORDS:
            hint = (
                " The gradient flow has no learning rate (it is gradient descent's "
                "lr -> 0 limit): run gradient descent with gflow.gradient_descent("
                "..., lr=...), or integrate a flow that models an optimiser at a "
                "finite rate, flow=gflow.flows.ModifiedGD(lr) (or HeavyBall, SGD, "
                "CentralFlow)."
            )
        raise TypeError(
            f"gflow.{entry}() got an unexpected keyword argument `{name}`.{hint}"
        )
    kw = {name: given.get(name, KEYWORDS[name].default) for name in allowed}
    t_max = check_t_max(t_max)
    # A flow may be saved at gradient descent's times, which end on its last
    # step: at or before t_max.
    saves = SaveTimes.build(
        t_max,
        kw["ts"],
        kw["n_save"],
        kw["spacing"],
        kw["params_at"],
        short_ts="solver" in allowed,
    )
    solver = stopping = None
    if "solver" in allowed:
        solver = SolverOptions(
            resolve_solver(kw["solver"]),
            kw["rtol"],
            kw["atol"],
            kw["dt0"],
            kw["max_steps"],
        )
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
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=KEYWORDS[name].default,
                annotation=KEYWORDS[name].type,
            )
            for name in keywords
        ]
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
