"""Figures over time: loss, metrics, phases, attention scores, group losses,
effective ranks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.axes import Axes
from numpy.typing import ArrayLike

from .._phases import Phases
from .._trajectory import Trajectory
from ._style import figure


def _axes(ax: Axes | None) -> Axes:
    """`ax`, or the Axes of a new figure (`gflow.plot.figure`: its layout keeps the
    labels inside it; sized for a paper inside `gflow.plot.paper()`)."""
    if ax is None:
        _, ax = figure(size=(6, 4))
    return ax


def _time(ts, log_time: bool) -> tuple[np.ndarray, slice]:
    ts = np.asarray(ts)
    keep = slice(1, None) if log_time and ts[0] <= 0 else slice(None)
    return ts[keep], keep


def series(
    ts: ArrayLike,
    values: ArrayLike,
    *,
    label: str | Sequence[str] | None = None,
    ax: Axes | None = None,
    log_time: bool = True,
    log_y: bool = False,
    **style: Any,
) -> Axes:
    """Values over time: `values` has a leading time axis (and may have one more).

    Args:
        ts: the save times.
        values: `(T,)` or `(T, k)`; with k columns, `label` may name each.
        label: legend label(s).
        ax: the Axes to draw on (default: a new figure).
        log_time: logarithmic time axis (`t = 0` is left out).
        log_y: logarithmic value axis.
        **style: passed to `ax.plot`.

    Returns:
        The Axes.

    Examples:
        >>> gflow.plot.series(traj.ts, traj.metrics["norm"], label="|θ|")
    """
    ax = _axes(ax)
    t, keep = _time(ts, log_time)
    values = np.asarray(values)[keep]
    lines = ax.plot(t, values, **style)
    if label is not None:
        labels = [label] if isinstance(label, str) else list(label)
        for line, name in zip(lines, labels, strict=True):
            line.set_label(name)
    ax.set_xscale("log" if log_time else "linear")
    ax.set_yscale("log" if log_y else "linear")
    ax.set_xlabel("gradient-flow time t")
    return ax


def loss(
    trajectories: Trajectory | Sequence[Trajectory],
    labels: str | Sequence[str] | None = None,
    *,
    phases: Phases | None = None,
    ax: Axes | None = None,
    log_time: bool = True,
    log_y: bool = True,
    **style: Any,
) -> Axes:
    """Loss curves of one or several trajectories on a common time axis.

    Args:
        trajectories: a Trajectory or several (e.g. the flow and gradient descent
            at several learning rates: GD's step k sits at t = k·lr).
        labels: their legend labels.
        phases: a `gflow.detect_phases` result: Phase 1 and Phase 2 are shaded and
            the end of Phase 1 is marked.
        ax: the Axes to draw on (default: a new figure).
        log_time: logarithmic time axis (`t = 0` is left out).
        log_y: logarithmic loss axis.
        **style: passed to `ax.plot`.

    Returns:
        The Axes.

    Examples:
        >>> ax = gflow.plot.loss([flow, gd], ["gradient flow", "GD, lr=0.1"])
        >>> gflow.plot.loss(flow, phases=gflow.detect_phases(flow, model, data))
    """
    if isinstance(trajectories, Trajectory):
        trajectories = [trajectories]
        labels = [labels] if isinstance(labels, str) else labels
    labels = labels or [None] * len(trajectories)
    ax = _axes(ax)
    for traj, label in zip(trajectories, labels, strict=True):
        series(
            traj.ts,
            traj.loss,
            label=label,
            ax=ax,
            log_time=log_time,
            log_y=log_y,
            **style,
        )
    ax.set_ylabel("loss")
    if phases is not None:
        _shade_phases(ax, phases)
        if phases.t1 is not None:
            mark_time(ax, phases.t1, "end of Phase 1")
    if any(label is not None for label in labels):
        ax.legend()
    return ax


def mark_time(
    ax: Axes,
    t: float,
    label: str | None = None,
    *,
    y: float = 1.0,
    legend: bool = False,
    **style: Any,
) -> Axes:
    """A vertical line at time `t` (e.g. a phase boundary).

    Args:
        ax: the Axes to draw on.
        t: the time.
        label: what the line marks.
        y: the height (axes fraction) of the label written beside the line.
        legend: put the label in the legend instead of beside the line (where it
            may cover data).
        **style: passed to `ax.axvline` (default: a thin dark dashed line).

    Returns:
        The Axes.
    """
    style = {"color": "0.3", "ls": "--", "lw": 1, **style}
    ax.axvline(t, label=label if legend else None, **style)
    if label and not legend:
        ax.annotate(
            label,
            (t, y),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize="small",
        )
    return ax


_PHASE_COLORS = ("0.88", "#fde7c8", "#d9ecf7", "#e6f2dc")


def phases(ax: Axes, phases: Phases, *, colors: Sequence[str] = _PHASE_COLORS) -> Axes:
    """Shade the phases found by `gflow.detect_phases` (or
    `detect_condensation_stages`) on a time axis, each labelled in the legend.

    Nothing is drawn when no phase boundary was found.

    Args:
        ax: the Axes (with a time axis) to shade.
        phases: what `gflow.detect_phases` found.
        colors: the colours of the phases, in order.

    Returns:
        The Axes.

    Examples:
        >>> ax = gflow.plot.loss(traj)
        >>> gflow.plot.phases(ax, gflow.detect_phases(traj, model, data))
    """
    return _shade_phases(ax, phases, colors)


def _shade_phases(ax, found, colors=_PHASE_COLORS):
    if not found.found:
        return ax
    labels = np.array(found.labels)
    names = list(dict.fromkeys(found.labels))
    left = ax.get_xlim()[0]
    for i, name in enumerate(names):
        where = np.nonzero(labels == name)[0]
        start = found.ts[where[0]] if where[0] > 0 else left
        # Each phase runs to the first save of the next one.
        end = found.ts[min(where[-1] + 1, len(labels) - 1)]
        ax.axvspan(start, end, color=colors[i % len(colors)], zorder=0, label=name)
    ax.set_xlim(left=left)
    return ax


def _over_saves(fn: Callable, traj: Trajectory) -> np.ndarray:
    """`fn(params)` at every row that holds parameters, stacked (leading time
    axis; `traj.ts[traj.param_rows]` are its times)."""
    return np.asarray(jax.lax.map(fn, traj.params))


def attention_scores(
    traj: Trajectory,
    model: Any,
    pairs: Mapping[str, tuple[int, int]] | None = None,
    *,
    relative: bool = True,
    ax: Axes | None = None,
    log_time: bool = True,
    **style: Any,
) -> Axes:
    """Attention scores over time, for a model that declares them (Yang et al.
    Fig. 1a for `gflow.models.CooccurrenceTransformer`).

    Args:
        traj: a flow of `model`.
        model: a model with `attention_score(params, i, j)` and, unless `pairs` is
            given, `attention_pairs` (`{label: (i, j)}`).
        pairs: `{label: (i, j)}`: which scores to draw (default: the model's).
        relative: plot the change since `t = 0` (default), which is what moves
            when the scores start at random values.
        ax: the Axes to draw on (default: a new figure).
        log_time: logarithmic time axis.
        **style: passed to `ax.plot`.

    Returns:
        The Axes.

    Examples:
        >>> gflow.plot.attention_scores(traj, model)
    """
    pairs = _declared(model, "attention_pairs") if pairs is None else pairs
    score = _declared(model, "attention_score")

    def scores(params):
        return jnp.stack([score(params, i, j) for i, j in pairs.values()])

    values = _over_saves(scores, traj)
    if relative:
        values = values - values[0]
    ax = series(
        traj.ts[traj.param_rows],
        values,
        label=list(pairs),
        ax=ax,
        log_time=log_time,
        **style,
    )
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylabel("change since t = 0" if relative else "attention score")
    ax.legend(fontsize="small")
    return ax


def _declared(model, name: str):
    """What `model` declares under `name`, or a TypeError saying it declares none."""
    value = getattr(model, name, None)
    if value is None:
        raise TypeError(
            f"{type(model).__name__} declares no `{name}`: this figure needs it "
            "(see gflow.models.CooccurrenceTransformer for an example)."
        )
    return value


def group_losses(
    traj: Trajectory,
    model: Any,
    data: Any,
    names: Sequence[str] | None = None,
    *,
    total: bool = True,
    ax: Axes | None = None,
    log_time: bool = True,
    log_y: bool = True,
    **style: Any,
) -> Axes:
    """The loss of each group of samples over time (Yang et al. Fig. 1b).

    Args:
        traj: a flow.
        model: a model with `group_losses(params, data) -> (k,)`, such as
            `gflow.models.CooccurrenceTransformer` (groups I1..I4).
        data: the data the groups are taken from.
        names: the groups' names (default: the model's `group_names` if it
            declares them, else "group 0", ...).
        total: also draw the total loss `traj.loss`.
        ax: the Axes to draw on (default: a new figure).
        log_time: logarithmic time axis.
        log_y: logarithmic loss axis.
        **style: passed to `ax.plot`.

    Returns:
        The Axes.

    Examples:
        >>> gflow.plot.group_losses(traj, model, data)
    """
    values = _over_saves(lambda p: model.group_losses(p, data), traj)
    if names is None:
        names = getattr(model, "group_names", None) or [
            f"group {i}" for i in range(values.shape[1])
        ]
    ax = _axes(ax)
    if total:
        series(
            traj.ts,
            traj.loss,
            label="total",
            ax=ax,
            log_time=log_time,
            log_y=log_y,
            color="k",
            lw=2.5,
        )
    series(
        traj.ts[traj.param_rows],
        values,
        label=list(names),
        ax=ax,
        log_time=log_time,
        log_y=log_y,
        **style,
    )
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    return ax


def effective_rank(
    traj: Trajectory,
    keys: Sequence[str],
    *,
    ax: Axes | None = None,
    log_time: bool = False,
    **style: Any,
) -> Axes:
    """The effective rank (`gflow.metrics.effective_rank`) of weight matrices over
    time: rank collapse shows as a fall towards 1 (Chen & Luo Fig. 1).

    Args:
        traj: a flow whose parameters are a dict holding the matrices.
        keys: the names of the matrices, e.g. `["W_Q", "W_K"]`.
        ax: the Axes to draw on (default: a new figure).
        log_time: logarithmic time axis (linear by default).
        **style: passed to `ax.plot`.

    Returns:
        The Axes.

    Examples:
        >>> gflow.plot.effective_rank(traj, ["W_Q", "W_K", "W_V"])
    """
    from ..metrics import effective_rank as rank

    values = _over_saves(lambda p: jnp.stack([rank(p[k]) for k in keys]), traj)
    ax = series(
        traj.ts[traj.param_rows],
        values,
        label=list(keys),
        ax=ax,
        log_time=log_time,
        **style,
    )
    ax.set_ylabel("effective rank")
    ax.legend(fontsize="small")
    return ax
