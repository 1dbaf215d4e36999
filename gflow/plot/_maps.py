"""Figures that are maps: row similarities, phase portraits, basins, and
work-precision diagrams."""

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

from .._trajectory import Trajectory
from ._time import _axes


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
        ax.set_title(title, fontsize="medium")
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

    Examples:
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
        ax.contour(
            fx,
            fy,
            values,
            levels=15 if levels is None else levels,
            colors="C0",
            linewidths=0.5,
            alpha=0.5,
        )
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

    Examples:
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
    ax.pcolormesh(
        x,
        y,
        shown.T,
        cmap=cmap,
        vmin=-0.5,
        vmax=len(names) + 0.5,
        shading="nearest",
        rasterized=True,
    )
    handles = [Patch(color=c, label=n) for c, n in zip(colors, names, strict=False)]
    if (grid < 0).any():
        handles.append(Patch(color=colors[-1], label="unresolved"))
    if exact is not None:
        exact = np.asarray(exact).reshape(grid.shape)
        ax.contour(
            x, y, exact.T.astype(float), levels=[0.5], colors="k", linewidths=1.5
        )
        handles.append(plt.Line2D([], [], color="k", label="analytical boundary"))
        wrong = (grid >= 0) & ((grid == 1) != exact)
        if wrong.any():
            xi, yi = np.nonzero(wrong)
            ax.plot(x[xi], y[yi], "x", color="C3", ms=4)
            handles.append(
                plt.Line2D([], [], color="C3", marker="x", ls="", label="disagree")
            )
    ax.legend(handles=handles, loc="upper right", fontsize="x-small", framealpha=0.9)
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

    Examples:
        >>> results = json.load(open("benchmarks/results/flow_vs_gd_cpu.json"))
        >>> for name, problem in results["problems"].items():
        ...     gflow.plot.work_precision(problem["rows"], title=name)
    """
    ax = _axes(ax)
    families = dict.fromkeys(r["family"] for r in rows)
    for family in families:
        mine = [r for r in rows if r["family"] == family and np.isfinite(r["error"])]
        mine.sort(key=lambda r: r[work])
        (line,) = ax.loglog(
            [r[work] for r in mine],
            [r["error"] for r in mine],
            "o-" if len(mine) > 1 else "s",
            label=family,
            ms=7,
            lw=2,
        )
        for r in mine:
            if r.get("label"):
                ax.annotate(
                    r["label"],
                    (r[work], r["error"]),
                    xytext=(5, 4),
                    textcoords="offset points",
                    fontsize="xx-small",
                    color=line.get_color(),
                )
    xlabel = {"grad_evals": "gradient evaluations", "run_time_s": "run time (s)"}
    ax.set(
        xlabel=xlabel.get(work, work),
        ylabel="relative trajectory error (max over save times)",
        title=title,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small")
    return ax
