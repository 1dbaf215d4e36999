"""The outcomes of a run: names, integer codes and the messages users see.

A leaf module. Codes are positions in `RESULTS`, which is how the compiled engine
carries them; "running" is the code of a lane still at work and never the result of
a finished run. Each message is a template: `{where}` says when and at what loss,
`{max_steps}` the step budget, `{advice}` what to try for this kind of run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RESULTS: dict[str, str] = {
    "running": "",
    "successful": "",
    "stopped_at_loss": "the loss fell to `stop_at_loss` {where}.",
    "stopped_at_grad_norm": "the gradient norm fell to `stop_at_grad_norm` {where}.",
    "stopped_by_condition": "`stop_when` held {where}.",
    "max_steps_reached": (
        "the solver used all max_steps={max_steps} steps {where}. Raise `max_steps`, "
        "loosen rtol/atol, or, if the flow is stiff (its steps pinned near "
        "3/sharpness), use solver='auto' or a stabilized solver ('rkc2', 'rock4'). "
        "If the loss or |grad| is exploding, the flow itself may blow up in finite "
        "time."
    ),
    "diverged": (
        "the run diverged {where}: the loss or the parameters ran away (to inf/NaN "
        "after the last finite save, or too fast for the step size to follow at "
        "the resolution of t: a flow that blows up in finite time). {advice}"
    ),
    "dt_min_reached": (
        "the step size fell below the controller's minimum {where}: the solver "
        "cannot advance. Use float64 or a stiff solver (solver='auto')."
    ),
    "solver_failed": "the solver failed {where}.",
    "nonfinite_start": (
        "the loss or its gradient is inf/NaN at the initial parameters (t = 0), "
        "though the parameters and the data are finite: the loss is undefined "
        "there (a log or division at 0, an overflow)."
    ),
}

#: Names of the results, in the order of their codes.
RESULT_NAMES: tuple[str, ...] = tuple(RESULTS)
#: Results that mean a run ended where it was asked to.
SUCCESS_RESULTS = (
    "successful",
    "stopped_at_loss",
    "stopped_at_grad_norm",
    "stopped_by_condition",
)


def result_code(name: str) -> int:
    """The integer code of a result name."""
    return RESULT_NAMES.index(name)


RUNNING = result_code("running")


def result_names(codes: Any) -> Any:
    """Result names from codes: a string for a scalar, an array of strings else."""
    names = np.asarray(RESULT_NAMES)[np.asarray(codes)]
    return str(names) if names.ndim == 0 else names
