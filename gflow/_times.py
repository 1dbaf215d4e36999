"""Save times: validation of `t_max` and `ts`, and log- or linearly-spaced grids."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np


def check_t_max(t_max: Any) -> float:
    """`t_max` as a positive finite float, or a ValueError that says so."""
    try:
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


def check_ts(ts: Any) -> tuple[np.ndarray, float]:
    """User-given save times, checked; returns them as float64 and `t_max = ts[-1]`."""
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
    return array, float(array[-1])


def resolve_save_times(t_max: float, ts: Any, n_save: int, spacing: str) -> np.ndarray:
    """The save times of a run: `ts` checked against `t_max`, or a fresh grid."""
    if ts is None:
        return save_times(t_max, n_save, spacing)
    ts_np, ts_end = check_ts(ts)
    if not math.isclose(ts_end, t_max, rel_tol=1e-12):
        raise ValueError(
            f"`ts` must end at t_max = {t_max}; got ts[-1] = {ts_end}. Pass "
            "t_max=ts[-1], or append t_max to ts."
        )
    ts_np[-1] = t_max
    return ts_np
