"""Log- or linearly-spaced grids of save times."""

from __future__ import annotations

from typing import Literal

import numpy as np

from ._checks import check_t_max, require_int


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

    Examples:
        >>> gflow.save_times(100.0, 4)
        array([0.e+00, 1.e-02, 1.e+00, 1.e+02])
    """
    t_max = check_t_max(t_max)
    require_int("n_save", n, 2)
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
