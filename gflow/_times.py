"""Time: validation of `t_max`, and log- or linearly-spaced grids of save times."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np


def check_t_max(t_max: Any) -> float:
    """`t_max` as a positive finite float, or an error that says so (a TypeError for
    anything that is not a real number, strings included)."""
    try:
        if isinstance(t_max, str | bytes | bool):
            raise TypeError
        value = float(t_max)
    except (TypeError, ValueError):
        raise TypeError(
            f"`t_max` must be a positive real number; got {type(t_max).__name__}."
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`t_max` must be positive and finite; got {t_max!r}.")
    return value


def save_times(
    t_max: float,
    n: int = 101,
    spacing: Literal["log", "linear"] = "log",
    *,
    t_first: float | None = None,
) -> np.ndarray:
    """`n` save times from 0 to `t_max`.

    Training dynamics live on logarithmic time scales (a fast early phase, then slow
    drifts), so the default grid is `0` followed by `n - 1` geometrically spaced times
    from `t_first` to `t_max`.

    Args:
        t_max: the last time.
        n: how many times, at least 2.
        spacing: `"log"` (default) or `"linear"`.
        t_first: the first nonzero time of a log grid; default `t_max * 1e-4`.

    Returns:
        A float64 NumPy array of shape `(n,)`, with `ts[0] == 0` and `ts[-1] == t_max`.

    Example:
        >>> gflow.save_times(100.0, 4)
        array([0.e+00, 1.e-02, 1.e+00, 1.e+02])
    """
    t_max = check_t_max(t_max)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise ValueError(f"`n_save` must be an integer >= 2; got {n!r}.")
    if spacing == "linear":
        ts = np.linspace(0.0, t_max, int(n))
    elif spacing == "log":
        t_first = t_max * 1e-4 if t_first is None else float(t_first)
        if not 0 < t_first < t_max:
            raise ValueError(
                f"`t_first` must lie in (0, t_max) = (0, {t_max}); got {t_first!r}."
            )
        if n == 2:
            ts = np.array([0.0, t_max])
        else:
            rest = np.geomspace(t_first, t_max, int(n) - 1)
            ts = np.concatenate([[0.0], rest])
    else:
        raise ValueError(f"`spacing` must be 'log' or 'linear'; got {spacing!r}.")
    ts[-1] = t_max  # geomspace may miss t_max by an ulp
    return ts
