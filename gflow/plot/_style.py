"""Figures sized for a screen or for a paper, and saved as what they are for."""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
from collections.abc import Callable
from typing import Any

import matplotlib.pyplot as plt

#: Inches: a column, and the whole text width, of a two-column paper.
WIDTHS = {"column": 3.4, "page": 7.0}
_current = threading.local()
_MAX_PAPER_HEIGHT = 8.0  # inches; a paper's text is about 9 in tall


@contextlib.contextmanager
def paper(width: str | float = "column", *, font_size: float = 8.0):
    """Figures for a paper: inside this context, `gflow.plot.figure` makes them
    at the width of a column (3.4 in) or of a page (7 in), or any width in inches,
    with fonts, lines and markers that stay readable there. Save them as PDF or
    SVG (vector: sharp at any zoom) with `gflow.plot.save`.

    Args:
        width: `"column"`, `"page"`, or a width in inches.
        font_size: the text size in points (labels; ticks and legends a point
            smaller).

    Examples:
        >>> with gflow.plot.paper("column"):
        ...     fig, ax = gflow.plot.figure()
        ...     gflow.plot.loss(traj, ax=ax)
        ...     gflow.plot.save(fig, "loss.pdf")
    """
    inches = WIDTHS.get(width, width) if isinstance(width, str) else width
    if not isinstance(inches, int | float) or inches <= 0:
        raise ValueError(
            f"`width` must be 'column', 'page' or a positive number of inches; got "
            f"{width!r}."
        )
    small = font_size - 1
    style = {
        "font.size": font_size,
        "axes.titlesize": font_size,
        "axes.labelsize": font_size,
        "xtick.labelsize": small,
        "ytick.labelsize": small,
        "legend.fontsize": small,
        "lines.linewidth": 1.0,
        "lines.markersize": 3.0,
        "axes.linewidth": 0.6,
        "pdf.fonttype": 42,  # text as text in PDF (editable, searchable)
        "svg.fonttype": "none",
    }
    before = getattr(_current, "width", None)
    _current.width = float(inches)
    try:
        with plt.rc_context(style):
            yield
    finally:
        _current.width = before


_paper_style = paper  # `save_versions` takes an argument of the same name


def figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    size: tuple[float, float] = (5.5, 4.0),
    min_width: float = 2.2,
) -> tuple[Any, Any]:
    """A new figure of `nrows` × `ncols` panels, with a layout that keeps every
    label inside it: `size` (inches) per panel on a screen.

    Inside `gflow.plot.paper()` the figure takes the paper's width, and panels
    that would be narrower than `min_width` inches (too narrow for readable
    labels) flow into fewer columns: a row of three panels in a column stacks
    them. The axes still come back in the shape asked for, so the same drawing
    code serves both. The panels keep their shape, up to 8 in of height in all.
    `min_width=0` keeps the grid (small multiples such as heat maps).

    Returns:
        `(figure, axes)` as `matplotlib.pyplot.subplots` returns them.

    Examples:
        >>> fig, (left, right) = gflow.plot.figure(1, 2)
    """
    width, height = size
    inches = getattr(_current, "width", None)
    if inches is None:
        figsize = (width * ncols, height * nrows)
        return plt.subplots(nrows, ncols, figsize=figsize, layout="constrained")
    panels = nrows * ncols
    fits = int(inches // min_width) if min_width > 0 else ncols
    columns = min(ncols, max(1, fits))
    rows = -(-panels // columns)
    panel_height = inches / columns * height / width
    figsize = (inches, min(rows * panel_height, _MAX_PAPER_HEIGHT))
    fig, grid = plt.subplots(
        rows, columns, figsize=figsize, layout="constrained", squeeze=False
    )
    cells = grid.ravel()
    for unused in cells[panels:]:
        unused.remove()
    axes = cells[:panels].reshape(nrows, ncols)
    if panels == 1:
        return fig, axes[0, 0]
    return fig, axes.squeeze() if 1 in (nrows, ncols) else axes


def save(figure, path: str | os.PathLike, **options) -> pathlib.Path:
    """Save a figure as its file's extension says: PDF, SVG or EPS as vector
    graphics, PNG at 150 dots per inch (enough for a screen); nothing cut off
    at the edges.

    Returns:
        The path written.
    """
    path = pathlib.Path(path)
    raster = path.suffix.lower() not in (".pdf", ".svg", ".eps")
    options = {"dpi": 150 if raster else "figure", "bbox_inches": "tight", **options}
    figure.savefig(path, **options)
    return path


def save_versions(
    make: Callable[[], Any],
    stem: str | os.PathLike,
    *,
    paper: str | float | None = None,
) -> list[pathlib.Path]:
    """Draw a figure for a screen (`stem`.png) and, if `paper` is given, again at a
    paper's width (`stem`.pdf, drawn inside `gflow.plot.paper(paper)`).

    Args:
        make: draws the figure and returns it; it should make it with
            `gflow.plot.figure`, so that its size follows the style.
        stem: the path without its extension.
        paper: `"column"`, `"page"`, a width in inches, or None for the PNG only.

    Returns:
        The paths written.

    Examples:
        >>> gflow.plot.save_versions(
        ...     lambda: my_figure(traj), "out/loss", paper="column"
        ... )
        [PosixPath('out/loss.png'), PosixPath('out/loss.pdf')]
    """
    stem = pathlib.Path(stem)
    styles = [(contextlib.nullcontext(), ".png")]
    if paper is not None:
        styles.append((_paper_style(paper), ".pdf"))
    paths = []
    for style, suffix in styles:
        with style:
            fig = make()
            paths.append(save(fig, stem.with_suffix(suffix)))
            plt.close(fig)
    return paths
