"""Matplotlib figures of trajectories.

Every function draws on an `ax` you may pass (or a new figure) and returns the Axes,
so the result can be restyled. Time axes are logarithmic by default, because
training dynamics live on log time scales; `t = 0` cannot sit on a log axis, so the
first save is left out there (it is drawn on linear axes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.image import AxesImage
from numpy.typing import ArrayLike

from ._phases import Phases
from ._trajectory import Trajectory


def _axes(ax: Axes | None) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
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

    Example:
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

    Example:
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
            fontsize=9,
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

    Example:
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


def reorder_by_top_eigenvector(similarity: ArrayLike) -> np.ndarray:
    """Row order that sorts a symmetric similarity matrix by its top eigenvector,
    so that condensed groups of rows appear as blocks.

    Args:
        similarity: a symmetric matrix.

    Returns:
        The row indices in their new order.
    """
    _, vectors = np.linalg.eigh(np.asarray(similarity))
    return np.argsort(vectors[:, -1])


def row_similarity(
    matrix: ArrayLike,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    reorder: bool = True,
) -> tuple[Axes, AxesImage]:
    """Heat map of the cosine similarity between the rows of `matrix`.

    Rows are reordered by the top eigenvector of the similarity matrix (Chen & Luo's
    convention), so rows condensed onto ± one direction form two blocks.

    Args:
        matrix: a 2-D array.
        ax: the Axes to draw on (default: a new figure).
        title: the Axes title.
        reorder: reorder the rows (and columns) by the top eigenvector.

    Returns:
        The Axes and the image (for a colour bar).
    """
    ax = _axes(ax)
    m = np.asarray(matrix)
    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    sim = unit @ unit.T
    if reorder:
        order = reorder_by_top_eigenvector(sim)
        sim = sim[np.ix_(order, order)]
    image = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return ax, image


def phase_portrait(
    loss: Any,
    names: tuple[str, str],
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    *,
    data: Any = None,
    trajectories: Sequence[Trajectory] = (),
    labels: Sequence[str] | None = None,
    invariant: Callable[[np.ndarray, np.ndarray], Any] | None = None,
    levels: int | Sequence[float] | None = None,
    ax: Axes | None = None,
    density: float = 1.2,
) -> Axes:
    """The flow field `-∇L` of a two-parameter model, with trajectories on it.

    Args:
        loss: `loss(params, data)` (or a model with `.loss`) of parameters
            `{names[0]: scalar, names[1]: scalar}`.
        names: the two parameter names: the x and y axes.
        xlim: the plotted range of `names[0]`.
        ylim: the plotted range of `names[1]`.
        data: passed to the loss.
        trajectories: flows to draw (start: circle, end: star).
        labels: their legend labels.
        invariant: optional `fn(x, y)` of a conserved quantity (e.g. an energy),
            drawn as level curves.
        levels: the level curves of `invariant` (a count or the values; default
            15).
        ax: the Axes to draw on (default: a new figure).
        density: streamline density.

    Returns:
        The Axes.

    Example:
        >>> model = gflow.models.MarkovCanonical(0.5, 0.8)
        >>> gflow.plot.phase_portrait(model, ("e", "w"), (0, 2), (-2, 1.5),
        ...                           invariant=gflow.models.markov_energy)
    """
    loss_fn = getattr(loss, "loss", loss)
    ax = _axes(ax)
    xs, ys = np.linspace(*xlim, 41), np.linspace(*ylim, 41)
    xx, yy = np.meshgrid(xs, ys)
    points = {names[0]: jnp.asarray(xx.ravel()), names[1]: jnp.asarray(yy.ravel())}
    grad = jax.vmap(jax.grad(loss_fn), in_axes=(0, None))(points, data)
    u = -np.asarray(grad[names[0]]).reshape(xx.shape)
    v = -np.asarray(grad[names[1]]).reshape(xx.shape)
    ax.streamplot(xx, yy, u, v, color="0.75", density=density, linewidth=0.8)
    if invariant is not None:
        fx, fy = np.meshgrid(np.linspace(*xlim, 300), np.linspace(*ylim, 300))
        values = np.asarray(invariant(fx, fy), dtype=float)
        values = np.where(np.isfinite(values), values, np.nan)
        ax.contour(fx, fy, values, levels=15 if levels is None else levels,
                   colors="C0", linewidths=0.5, alpha=0.5)  # fmt: skip
    labels = labels or [None] * len(trajectories)
    for traj, label in zip(trajectories, labels, strict=True):
        x, y = np.asarray(traj.params[names[0]]), np.asarray(traj.params[names[1]])
        (line,) = ax.plot(x, y, lw=2.5, label=label)
        ax.plot(x[0], y[0], "o", color=line.get_color())
        ax.plot(x[-1], y[-1], "*", ms=14, color=line.get_color())
    ax.set(xlim=xlim, ylim=ylim, xlabel=names[0], ylabel=names[1])
    return ax


def basin_map(
    x: ArrayLike,
    y: ArrayLike,
    labels: ArrayLike,
    *,
    names: Sequence[str],
    exact: ArrayLike | None = None,
    ax: Axes | None = None,
    colors: Sequence[str] = ("#f3c89b", "#a9cfe8", "0.6"),
) -> Axes:
    """Which basin each initial point of a 2-D grid flowed to.

    Args:
        x: the first grid axis (1-D), as passed to `gflow.grid({xname: x, ...})`.
        y: the second grid axis (1-D).
        labels: the basin label of each grid point: `gflow.basins(...).labels`
            (row-major, `len(x) * len(y)`); -1 for unresolved.
        names: the basin names, in label order (`gflow.basins(...).names`).
        exact: optional boolean array like `labels`: where an analytical answer
            says the flow goes to basin `names[1]`. Its boundary is drawn in black
            and the points where it disagrees with `labels` are marked.
        ax: the Axes to draw on (default: a new figure).
        colors: the colours of the basins (and of unresolved points, last).

    Returns:
        The Axes.

    Example:
        >>> b = gflow.basins(ens, {"local": 0.666, "global": 0.619})
        >>> gflow.plot.basin_map(es, ws, b.labels, names=b.names)
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ax = _axes(ax)
    x, y = np.asarray(x), np.asarray(y)
    grid = np.asarray(labels).reshape(len(x), len(y))
    shown = np.where(grid < 0, len(names), grid)
    cmap = ListedColormap(list(colors[: len(names)]) + [colors[-1]])
    ax.pcolormesh(x, y, shown.T, cmap=cmap, vmin=-0.5, vmax=len(names) + 0.5,
                  shading="nearest", rasterized=True)  # fmt: skip
    handles = [Patch(color=c, label=n) for c, n in zip(colors, names, strict=False)]
    if (grid < 0).any():
        handles.append(Patch(color=colors[-1], label="unresolved"))
    if exact is not None:
        exact = np.asarray(exact).reshape(grid.shape)
        ax.contour(x, y, exact.T.astype(float), levels=[0.5], colors="k",
                   linewidths=1.5)  # fmt: skip
        handles.append(plt.Line2D([], [], color="k", label="analytical boundary"))
        wrong = (grid >= 0) & ((grid == 1) != exact)
        if wrong.any():
            xi, yi = np.nonzero(wrong)
            ax.plot(x[xi], y[yi], "x", color="C3", ms=4)
            handles.append(
                plt.Line2D([], [], color="C3", marker="x", ls="", label="disagree")
            )
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
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

    Example:
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
        traj.ts[traj.param_rows], values, label=list(pairs), ax=ax,
        log_time=log_time, **style,
    )  # fmt: skip
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylabel("change since t = 0" if relative else "attention score")
    ax.legend(fontsize=9)
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

    Example:
        >>> gflow.plot.group_losses(traj, model, data)
    """
    values = _over_saves(lambda p: model.group_losses(p, data), traj)
    if names is None:
        names = getattr(model, "group_names", None) or [
            f"group {i}" for i in range(values.shape[1])
        ]
    ax = _axes(ax)
    if total:
        series(traj.ts, traj.loss, label="total", ax=ax, log_time=log_time,
               log_y=log_y, color="k", lw=2.5)  # fmt: skip
    series(traj.ts[traj.param_rows], values, label=list(names), ax=ax,
           log_time=log_time, log_y=log_y, **style)  # fmt: skip
    ax.set_ylabel("loss")
    ax.legend(fontsize=9)
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

    Example:
        >>> gflow.plot.effective_rank(traj, ["W_Q", "W_K", "W_V"])
    """
    from .metrics import effective_rank as rank

    values = _over_saves(lambda p: jnp.stack([rank(p[k]) for k in keys]), traj)
    ax = series(traj.ts[traj.param_rows], values, label=list(keys), ax=ax,
                log_time=log_time, **style)  # fmt: skip
    ax.set_ylabel("effective rank")
    ax.legend(fontsize=9)
    return ax


def work_precision(
    rows: Sequence[Mapping[str, Any]],
    *,
    ax: Axes | None = None,
    title: str | None = None,
    work: str = "grad_evals",
) -> Axes:
    """Error against work, one line per method family (lower left is better).

    Args:
        rows: dicts with `"family"` (the legend entry: rows of one family are
            joined by a line, e.g. one solver at several tolerances), the work
            (`"grad_evals"` by default) and `"error"`, as the benchmark scripts
            write them. A row's `"label"` (e.g. `"rtol 1e-6"`, `"lr 0.01"`) is
            written beside its point.
        ax: the Axes to draw on (default: a new figure).
        title: the Axes title.
        work: the key of the work: `"grad_evals"`, or another count or time the
            rows hold (e.g. `"run_time_s"`).

    Returns:
        The Axes.

    Example:
        >>> results = json.load(open("benchmarks/results/flow_vs_gd_cpu.json"))
        >>> for name, problem in results["problems"].items():
        ...     gflow.plot.work_precision(problem["rows"], title=name)
    """
    ax = _axes(ax)
    families = dict.fromkeys(r["family"] for r in rows)
    for family in families:
        mine = [r for r in rows if r["family"] == family and np.isfinite(r["error"])]
        mine.sort(key=lambda r: r[work])
        (line,) = ax.loglog([r[work] for r in mine], [r["error"] for r in mine],
                            "o-" if len(mine) > 1 else "s", label=family, ms=7,
                            lw=2)  # fmt: skip
        for r in mine:
            if r.get("label"):
                ax.annotate(r["label"], (r[work], r["error"]), xytext=(5, 4),
                            textcoords="offset points", fontsize=7,
                            color=line.get_color())  # fmt: skip
    xlabel = {"grad_evals": "gradient evaluations", "run_time_s": "run time (s)"}
    ax.set(
        xlabel=xlabel.get(work, work),
        ylabel="relative trajectory error (max over save times)",
        title=title,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return ax
