"""The edge-of-stability comparison: an optimiser's iterates against the flows
that model them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from .._compare import compare
from .._trajectory import Trajectory
from ..metrics import moving_average
from ._style import figure

_STYLES = (("k", "-"), ("C3", "--"), ("C2", "-."), ("C4", ":"))  # (colour, line)


def edge_of_stability(
    iterates: Trajectory,
    flows: Mapping[str, Trajectory],
    *,
    lr: float,
    sharpness: ArrayLike | None = None,
    sharpness_ts: ArrayLike | None = None,
    smoothing: int = 50,
) -> tuple[Figure, Any]:
    """Gradient descent (or another optimiser) at its edge of stability against
    the flows that model it, in three panels, on the step axis k = t / lr:

    - **loss**: the iterates' loss (raw, and a Gaussian moving average over
      `smoothing` steps), each flow's loss, and where a flow predicts the
      iterates' loss (`metrics["predicted_loss"]`: the central and rod flows),
      that prediction, dotted;
    - **sharpness**: lr·λ_max of the iterates (`sharpness`, e.g.
      `gflow.metrics.sharpness_along(gd[::10], loss, data)`, at `sharpness_ts`)
      and of each flow that saves it (`metrics["sharpness"]`), against the edge 2;
    - **distance**: the relative distance of the iterates' midpoints
      (θ_{k−1} + 2θ_k + θ_{k+1})/4 to each flow (`gflow.compare`).

    The iterates need every step saved (`ts=np.arange(steps + 1) * lr`) and the
    flows the same save times.

    Args:
        iterates: the optimiser's run (`gflow.gradient_descent`).
        flows: the continuous models by name, e.g. `{"gradient flow": flow,
            "central flow": central}` (drawn black, red dashed, green, purple).
        lr: the learning rate (steps are t / lr; the edge is lr·λ = 2).
        sharpness: λ_max of the iterates at `sharpness_ts` (optional).
        sharpness_ts: its times (default: the iterates' times, every one).
        smoothing: the moving average's width in steps (standard deviation).

    Returns:
        `(figure, axes)`: the three Axes (loss, sharpness, distance).

    Examples:
        >>> gd = gflow.gradient_descent(loss, data, 100.0, lr=0.1, params0=p0,
        ...                             ts=np.arange(1001) * 0.1)
        >>> flow = gflow.simulate(loss, data, 100.0, params0=p0, ts=gd.ts)
        >>> central = gflow.simulate(loss, data, 100.0, params0=p0, ts=gd.ts,
        ...                          flow=gflow.flows.CentralFlow(0.1))
        >>> fig, axes = gflow.plot.edge_of_stability(
        ...     gd, {"gradient flow": flow, "central flow": central}, lr=0.1,
        ...     sharpness=gflow.metrics.sharpness_along(gd[::10], loss, data),
        ...     sharpness_ts=gd.ts[::10])
    """
    if not flows:
        raise ValueError("`flows` must name at least one flow to compare with.")
    if len(flows) > len(_STYLES):
        raise ValueError(f"at most {len(_STYLES)} flows fit one figure.")
    fig, (ax_loss, ax_sharp, ax_dist) = figure(1, 3, size=(5.2, 4.2))
    steps = np.asarray(iterates.ts) / lr
    raw = np.asarray(iterates.loss)
    ax_loss.plot(steps, raw, color="C0", alpha=0.25, lw=1, label="iterates")
    ax_loss.plot(steps, moving_average(raw, smoothing), color="C0", lw=3,
                 label=f"iterates, smoothed ({smoothing} steps)")  # fmt: skip
    midpoints = iterates.midpoints()
    for (name, traj), (color, line) in zip(
        flows.items(), _STYLES[: len(flows)], strict=True
    ):
        at = np.asarray(traj.ts) / lr
        ax_loss.plot(at, traj.loss, color=color, ls=line, lw=1.5, label=name)
        if "predicted_loss" in traj.metrics:
            ax_loss.plot(at, traj.metrics["predicted_loss"], color=color, ls=":",
                         lw=2, label=f"{name}: predicted loss")  # fmt: skip
        if "sharpness" in traj.metrics:
            ax_sharp.plot(at, lr * np.asarray(traj.metrics["sharpness"]),
                          color=color, ls=line, lw=1.5, label=name)  # fmt: skip
        far = compare(traj, midpoints)
        ax_dist.semilogy(np.asarray(far.ts) / lr, far.param_distance, color=color,
                         ls=line, lw=1.5, label=name)  # fmt: skip
    if sharpness is not None:
        at = steps if sharpness_ts is None else np.asarray(sharpness_ts) / lr
        ax_sharp.plot(at, lr * np.asarray(sharpness), "o", color="0.4", ms=2.5,
                      label="iterates: lr·λ_max")  # fmt: skip
    ax_sharp.axhline(2.0, color="k", ls=":", lw=1, label="edge of stability (2)")
    ax_loss.set(xlabel="step", ylabel="loss", ylim=(0, None), title="Loss")
    ax_sharp.set(xlabel="step", ylabel="lr · λ_max", ylim=(0, None),
                 title="Sharpness")  # fmt: skip
    ax_dist.set(xlabel="step", ylabel="relative parameter distance",
                title="Midpoints of the iterates against the flows")  # fmt: skip
    for ax in (ax_loss, ax_sharp, ax_dist):
        ax.legend(fontsize="small")
    return fig, (ax_loss, ax_sharp, ax_dist)
