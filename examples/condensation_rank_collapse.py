"""From condensation to rank collapse (Chen & Luo, NeurIPS 2025), with the true flow.

Their Definition 3 model f(X) = tanh(Attn(X) W1) W2 (last position, exponential
loss) from a small initialisation N(0, ε²), trained on their anchor-function task
(labels ±1: whether the target token lies in the upper half of its range).

Three stages appear, as in their Fig. 1:

1. condensation: the outer weights W_V, W1, W2 escape the small-init regime, and the
   rows of W_V and W1 align to ± one direction (mean |row cosine| → 1), while W_Q and
   W_K have not moved; the two balances of papers.md stay constant;
2. key–query rank collapse: W_Q, W_K start to grow and W_Q / ‖W_Q‖_F collapses
   towards rank one (entropy effective rank of Roy & Vetterli → near 1);
3. further training: the loss falls and the rank partly recovers.

The stage boundaries come from `gflow.detect_condensation_stages`: condensation
above 0.9 for both W_V and W1, then the minimum of W_Q's effective rank.

Run:  python examples/condensation_rank_collapse.py [--full] [--out DIR]
(--full: d_m = 16, 256 samples, t up to 40,000 instead of d_m = 8, 64 samples,
t up to 12,000.) Writes DIR/condensation_dynamics.png,
DIR/condensation_heatmaps.png and DIR/condensation_summary.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")

import gflow  # noqa: E402
from gflow.metrics import effective_rank  # noqa: E402
from gflow.models import CondensationTransformer, anchor_data  # noqa: E402

MATRICES = ("W_Q", "W_K", "W_V", "W1")


def run(d_m, n, eps, t_max, seed=0):
    model = CondensationTransformer(d_m=d_m, s=10, eps=eps)
    data = anchor_data(jax.random.key(seed), n=n, d_m=d_m)
    metrics = {
        "effective_rank": lambda p, d: {k: effective_rank(p[k]) for k in MATRICES},
        "balances": model.stage1_balances,
    }
    # Log-spaced saves for the slow escape, plus linearly spaced ones for the short
    # window in which the stages follow each other.
    ts = np.union1d(np.geomspace(1.0, t_max, 300), np.linspace(0.0, t_max, 601))
    traj = gflow.simulate(model, data, t_max, ts=ts, key=seed + 1, metrics=metrics)
    return model, traj


def relative_change(traj, name):
    w = np.asarray(traj.params[name])
    change = np.linalg.norm((w - w[0]).reshape(len(w), -1), axis=1)
    return change / np.linalg.norm(w[0])


def dynamics_figure(traj, end1, collapse):
    ts = np.asarray(traj.ts)
    names = ("W_Q", "W_K", "W_V", "W1", "W2")
    changes = np.stack([relative_change(traj, k) for k in names], axis=1)
    # Everything after the slow escape happens within a short window: zoom on it
    # with a linear time axis.
    zoom = ts >= 0.8 * ts[end1]
    fig, axes = gflow.plot.figure(2, 2, size=(6.5, 4.5))
    (ax_escape, ax_norm), (ax_rank, ax_loss) = axes

    gflow.plot.series(ts, changes, label=list(names), ax=ax_escape, log_y=True, lw=2)
    ax_escape.set(
        xlim=(ts[1], ts[-1]),
        ylabel="‖W(t) − W(0)‖ / ‖W(0)‖",
        title="(a) escape from the small init: outer weights first",
    )
    gflow.plot.series(
        ts[zoom], changes[zoom], ax=ax_norm, log_time=False, log_y=True, lw=2
    )
    ax_norm.set(
        ylabel="‖W(t) − W(0)‖ / ‖W(0)‖",
        title="(b) zoom: W_Q, W_K move only after condensation",
    )
    gflow.plot.effective_rank(traj[zoom], MATRICES, ax=ax_rank, lw=2)
    # W_Q and W_K follow each other closely: draw W_Q dashed, on top.
    for ax in (ax_norm, ax_rank):
        ax.get_lines()[0].set(ls=(0, (4, 3)), zorder=3)
    ax_rank.set(
        ylabel="effective rank (Roy & Vetterli)",
        title="(c) zoom: W_Q collapses towards rank one,\nthen partly recovers",
    )
    gflow.plot.series(
        ts[zoom],
        np.asarray(traj.loss)[zoom],
        ax=ax_loss,
        log_time=False,
        log_y=True,
        color="k",
        lw=2,
    )
    ax_loss.set(ylabel="loss", title="(d) zoom: loss")
    condensed = f"condensed (t = {ts[end1]:.0f})"
    collapsed = f"rank collapse (t = {ts[collapse]:.0f})"
    for ax in axes.ravel():
        gflow.plot.mark_time(ax, ts[end1], condensed, legend=True)
        gflow.plot.mark_time(ax, ts[collapse], collapsed, legend=True, ls=":", lw=1.5)
    ax_escape.legend(fontsize="small", loc="upper left")
    ax_norm.legend(fontsize="small", loc="lower right")
    ax_rank.legend(fontsize="small", loc="upper right")
    ax_loss.legend(fontsize="small", loc="lower left")
    fig.suptitle(
        "Condensation, then key–query rank collapse (Chen & Luo):\n"
        "the gradient flow from an ε-small initialisation",
        fontsize="large",
    )
    return fig


def heatmap_figure(traj, end1, collapse):
    moments = {
        "t = 0": 0,
        f"condensed\nt = {float(traj.ts[end1]):.0f}": end1,
        f"collapsed\nt = {float(traj.ts[collapse]):.0f}": collapse,
        f"end\nt = {float(traj.ts[-1]):.0f}": len(traj) - 1,
    }
    names = ("W_V", "W1", "W_Q")
    fig, axes = gflow.plot.figure(
        len(names),
        len(moments),
        size=(13 / len(moments), 9.5 / len(names)),
        min_width=0,  # one row per matrix, one column per moment, even in a paper
    )
    for row, name in enumerate(names):
        for col, (when, index) in enumerate(moments.items()):
            _, image = gflow.plot.row_similarity(
                np.asarray(traj.params[name][index]),
                ax=axes[row, col],
                title=when if row == 0 else None,
            )
        axes[row, 0].set_ylabel(name)
    fig.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity between rows")
    fig.suptitle(
        "Row cosine similarity,\nrows reordered by the top eigenvector",
        fontsize="large",
    )
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--out", default="out/condensation")
    parser.add_argument(
        "--paper",
        choices=["column", "page"],
        help="also write the figures as PDF, at a paper's column or page width",
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d_m, n, t_max = (16, 256, 40000.0) if args.full else (8, 64, 12000.0)

    model, traj = run(d_m, n, args.eps, t_max)
    stages = gflow.detect_condensation_stages(traj)
    print(traj.summary())
    print(stages.summary())
    if not stages.found:
        raise SystemExit("no condensation found; see the summary above")
    ts = np.asarray(traj.ts)
    end1, collapse = np.searchsorted(ts, stages.t1), np.searchsorted(ts, stages.t2)
    first, second = (np.asarray(b) for b in traj.metrics["balances"])
    result = {
        "setting": {"d_m": d_m, "n": n, "eps": args.eps, "t_max": t_max},
        "condensed_at": float(traj.ts[end1]),
        "rank_collapse_at": float(traj.ts[collapse]),
        "W_Q_effective_rank": {
            "initial": float(traj.metrics["effective_rank"]["W_Q"][0]),
            "at_collapse": float(traj.metrics["effective_rank"]["W_Q"][collapse]),
            "final": float(traj.metrics["effective_rank"]["W_Q"][-1]),
        },
        "W_Q_relative_change_when_condensed": float(relative_change(traj, "W_Q")[end1]),
        "balance_drift_over_eps2_until_condensed": float(
            max(
                np.abs(first[: end1 + 1] - first[0]).max(),
                np.abs(second[: end1 + 1] - second[0]).max(),
            )
            / args.eps**2
        ),
        "final_loss": float(traj.loss[-1]),
    }
    print(json.dumps(result, indent=2))
    gflow.plot.save_versions(
        lambda: dynamics_figure(traj, end1, collapse),
        out / "condensation_dynamics",
        paper=args.paper,
    )
    gflow.plot.save_versions(
        lambda: heatmap_figure(traj, end1, collapse),
        out / "condensation_heatmaps",
        paper=args.paper,
    )
    (out / "condensation_summary.json").write_text(json.dumps(result, indent=2))
    print(
        f"wrote {out}/condensation_dynamics.png, condensation_heatmaps.png, "
        "condensation_summary.json"
    )
    return result


if __name__ == "__main__":
    main()
