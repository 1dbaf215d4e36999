"""Local to global (Makkuva et al., NeurIPS 2024): where the gradient flow goes.

Binary Markov chain with p = P(0→1) = 0.5 and q = P(1→0) = 0.8 (p + q > 1).

(a) The canonical reduced model θ = (e, w) with the optimal bias: the flow follows
    the level sets of the conserved energy E = e² − w² − sign(w) log|w|. The
    separatrix through the saddle (0, −1/√2) splits the plane: initialisations with
    w ≥ 0 or between its branches go to the unigram local minimum (e = 0), the
    rest to the curve of global minima (1 + 2w|w|) e² = log[(1−p)(1−q)/(pq)].
(b) The three worked cases of papers.md: (0.1, 0.1) ends at the unigram loss
    0.66628; (0.1, −1.0) and (1.5, −0.3) at the entropy rate 0.61901.
(c) The full single-layer transformer (d = 8) on a fixed sample of sequences, their
    Fig. 4 with the true flow: from the standard Gaussian initialisation it ends at
    the unigram loss, from their proposed initialisation at the bigram loss
    (held-out losses printed).

(d) Basins: a grid of the (e, w) plane, each point labelled by the limit of its
    flow (gflow.simulate_ensemble), for p + q > 1 and p + q < 1, against the
    analytical basins; and the full transformer from many Gaussian inits against
    many perturbations of the proposed init (8 each on 64 sequences of length 16
    to t = 300, and a 100 x 100 grid, by default; 64 each on 128 sequences to
    t = 600, and 200 x 200, with --full).

Run:  python examples/markov_local_to_global.py [--full | --quick] [--out DIR]
(default: 111 s on a 2-core CPU; --full: 512 training sequences of length
32 and t = 1000 for (c), held-out losses 0.66632 and 0.62005, and the larger
ensembles of (d): 12 minutes; --quick: a smoke run whose full model is not
converged.)

Writes DIR/markov_local_to_global.png, DIR/markov_basins.png and
DIR/markov_summary.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import numpy as np  # noqa: E402

import gflow  # noqa: E402
from gflow.models import (  # noqa: E402
    MARKOV_SEPARATRIX_ENERGY,
    MarkovCanonical,
    MarkovTransformer,
    markov_data,
    markov_energy,
    markov_reference_losses,
)

P, Q = 0.5, 0.8
WORKED_CASES = [(0.1, 0.1), (0.1, -1.0), (1.5, -0.3)]


def canonical_flows(t_max=2000.0):
    model = MarkovCanonical(P, Q)
    return model, [
        gflow.simulate(
            model,
            None,
            t_max,
            params0={"e": jnp.array(e), "w": jnp.array(w)},
            rtol=1e-10,
            atol=1e-12,
            n_save=400,
        )
        for e, w in WORKED_CASES
    ]


def full_model_flows(n_seqs, seq_len, t_max):
    train = markov_data(jax.random.key(0), P, Q, n_seqs=n_seqs, seq_len=seq_len)
    held_out = markov_data(jax.random.key(1), P, Q, n_seqs=4000, seq_len=seq_len)
    model = MarkovTransformer(d=8, seq_len=seq_len)  # one loss, one compile
    runs = {}
    for init in ("gaussian", "makkuva"):
        params0 = MarkovTransformer(d=8, seq_len=seq_len, init=init).init(
            jax.random.key(2)
        )
        traj = gflow.simulate(model, train, t_max, params0=params0, n_save=200)
        runs[init] = (traj, float(model.loss(traj.final, held_out)))
    return runs


def basin_maps(n):
    """Label an n x n grid of the (e, w) plane by the limit of each flow, for
    p + q > 1 and p + q < 1, against the analytical basins."""
    axis = jnp.linspace(-2.0, 2.0, n)
    params0 = gflow.grid({"e": axis, "w": axis})
    maps = {}
    for p, q in ((P, Q), (0.2, 0.3)):
        model = MarkovCanonical(p, q)
        unigram, entropy_rate = markov_reference_losses(p, q)
        # The loss never increases along a flow: once it is within 1e-4 of the
        # global minimum the limit is certain, so stop there.
        ens = gflow.simulate_ensemble(
            model,
            None,
            2000.0,
            params0=params0,
            save="final",
            stop_at_loss=entropy_rate + 1e-4,
            stop_at_grad_norm=1e-8,
        )
        found = gflow.basins(ens, {"local": unigram, "global": entropy_rate}, atol=1e-3)
        exact = np.asarray(model.reaches_global(params0["e"], params0["w"]))
        maps[(p, q)] = (found, exact, ens)
    return np.asarray(axis), maps


def init_ensembles(n_members, n_seqs, seq_len, t_max):
    """The full transformer from n Gaussian inits and from n perturbations of the
    proposed init: which minimum does each flow reach (by held-out loss)?"""
    train = markov_data(jax.random.key(0), P, Q, n_seqs=n_seqs, seq_len=seq_len)
    held_out = markov_data(jax.random.key(1), P, Q, n_seqs=4000, seq_len=seq_len)
    unigram, entropy_rate = markov_reference_losses(P, Q)
    # One model for the loss of both (the inits differ, the loss does not): one
    # compiled program serves both ensembles.
    model = MarkovTransformer(d=8, seq_len=seq_len)
    out = {}
    for init in ("gaussian", "makkuva"):
        init_fn = MarkovTransformer(d=8, seq_len=seq_len, init=init).init
        params0 = jax.vmap(init_fn)(jax.random.split(jax.random.key(3), n_members))
        if init == "makkuva":  # the proposed init, perturbed by N(0, 0.02²) noise
            leaves, tree = jax.tree.flatten(params0)
            keys = jax.random.split(jax.random.key(4), len(leaves))
            noisy = [
                x + 0.02 * jax.random.normal(k, x.shape)
                for x, k in zip(leaves, keys, strict=True)
            ]
            params0 = jax.tree.unflatten(tree, noisy)
        ens = gflow.simulate_ensemble(
            model, train, t_max, params0=params0, save="final"
        )
        held = np.asarray(jax.vmap(model.loss, in_axes=(0, None))(ens.final, held_out))
        out[init] = {
            "held_out_losses": held.tolist(),
            "fraction_bigram": float(
                np.mean(np.abs(held - entropy_rate) < np.abs(held - unigram))
            ),
            "member_steps": ens.stats["member_steps"],
            "wall_time_s": ens.stats["wall_time_s"],
        }
    return out


def basins_figure(axis, maps, inits):
    fig, axes = gflow.plot.figure(1, 3, size=(5.667, 5.2))
    for ax, ((p, q), (found, exact, _)) in zip(axes, maps.items(), strict=False):
        gflow.plot.basin_map(
            axis, axis, found.labels, names=found.names, exact=exact, ax=ax
        )
        agree = np.mean((found.labels == 1) == exact)
        ax.set(
            xlabel="embedding e",
            ylabel="weight w",
            title=f"({'ab'[p == 0.2]}) basins, p = {p}, q = {q} (p + q "
            f"{'>' if p + q > 1 else '<'} 1): {len(axis)}×{len(axis)} flows\n"
            f"agree with the separatrix at {agree:.2%} of points",
        )
    unigram, entropy_rate = markov_reference_losses(P, Q)
    ax = axes[2]
    for i, (init, label) in enumerate(
        (("gaussian", "Gaussian init"), ("makkuva", "proposed init, perturbed"))
    ):
        held = np.asarray(inits[init]["held_out_losses"])
        frac = inits[init]["fraction_bigram"]
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, held.size)
        ax.plot(
            i + jitter,
            held,
            "o",
            alpha=0.6,
            label=f"{label}: {frac:.0%} near bigram",
        )
    ax.axhline(unigram, color="0.3", ls=":", label=f"unigram {unigram:.4f}")
    ax.axhline(entropy_rate, color="0.3", ls="--", label=f"bigram {entropy_rate:.4f}")
    ax.set(
        xticks=[0, 1],
        xticklabels=["Gaussian", "proposed + noise"],
        xlim=(-0.5, 1.5),
        ylabel="held-out loss at t_max",
        title=f"(c) full transformer: {len(held)} flows per init",
    )
    ax.legend(fontsize="small", loc="center left")
    return fig


def draw_portrait(ax, model, flows):
    # E is ±infinite at w = 0 (an invariant line): leave a thin band out, or the
    # contour routine draws the jump there as a level line.
    def energy(e, w):
        return np.where(np.abs(w) < 0.02, np.nan, markov_energy(e, w))

    labels = [f"flow from ({e0}, {w0})" for e0, w0 in WORKED_CASES]
    gflow.plot.phase_portrait(
        model,
        ("e", "w"),
        (0.0, 2.0),
        (-2.0, 1.5),
        ax=ax,
        trajectories=flows,
        labels=labels,
        invariant=energy,
        levels=np.linspace(-4, 4, 17),
    )
    fine_e, fine_w = np.meshgrid(np.linspace(0, 2, 300), np.linspace(-2, 1.5, 351))
    energy = np.asarray(markov_energy(fine_e, fine_w))
    # The separatrix: the level set of the saddle's energy, on the side w < 0.
    ax.contour(
        fine_e,
        fine_w,
        np.where(fine_w < 0, energy, np.nan),
        levels=[MARKOV_SEPARATRIX_ENERGY],
        colors="C3",
        linewidths=2,
        linestyles="solid",
    )
    curve = np.log((1 - P) * (1 - Q) / (P * Q))
    w_min = fine_w[:, 0]
    a = 1 + 2 * w_min * np.abs(w_min)
    e_min = np.sqrt(np.where(a < 0, curve / np.where(a < 0, a, 1), np.nan))
    ax.plot(e_min, w_min, "k--", lw=1.5, label="global minima")
    ax.plot([], [], color="C3", lw=2, label="separatrix E = −(1 + log 2)/2")
    ax.plot(0, -1 / np.sqrt(2), "kX", ms=9, label="saddle (0, −1/√2)")
    ax.set(
        xlabel="embedding e",
        ylabel="weight w",
        title="(a) canonical (e, w) flow on energy level sets",
    )
    ax.legend(loc="upper right", fontsize="x-small")


def figure(model, flows, runs):
    unigram, entropy_rate = markov_reference_losses(P, Q)
    fig, (ax_portrait, ax_canon, ax_full) = gflow.plot.figure(1, 3, size=(5.667, 5.2))
    draw_portrait(ax_portrait, model, flows)
    for (e0, w0), traj in zip(WORKED_CASES, flows, strict=True):
        gflow.plot.loss(traj, f"from ({e0}, {w0})", ax=ax_canon, log_y=False, lw=2)
    for ax in (ax_canon, ax_full):
        ax.axhline(unigram, color="0.3", ls=":", label=f"unigram H(π) = {unigram:.5f}")
        ax.axhline(
            entropy_rate,
            color="0.3",
            ls="--",
            label=f"entropy rate = {entropy_rate:.5f}",
        )
    ax_canon.set(title="(b) canonical model: exact expected loss")
    ax_canon.legend(fontsize="small")
    for init, label in (
        ("gaussian", "standard Gaussian init"),
        ("makkuva", "their proposed init"),
    ):
        traj, held = runs[init]
        gflow.plot.loss(
            traj, f"{label} (held-out {held:.4f})", ax=ax_full, log_y=False, lw=2
        )
    ax_full.set(
        title="(c) full transformer, d = 8 (their Fig. 4, true flow)\n"
        "training loss; the legend gives the held-out loss",
        ylim=(entropy_rate - 0.02, 0.72),
    )
    ax_full.legend(fontsize="small")
    fig.suptitle(f"Local to global: Markov chain p = {P}, q = {Q}", fontsize="large")
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="larger full-model run")
    parser.add_argument(
        "--quick", action="store_true", help="a few-second smoke run (not converged)"
    )
    parser.add_argument("--out", default="out/markov")
    parser.add_argument(
        "--paper",
        choices=["column", "page"],
        help="also write the figures as PDF, at a paper's column or page width",
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, flows = canonical_flows()
    n_seqs, seq_len, t_max = (512, 32, 1000.0) if args.full else (256, 16, 600.0)
    if args.quick:
        n_seqs, seq_len, t_max = 32, 8, 20.0
    runs = full_model_flows(n_seqs, seq_len, t_max)
    grid_n = 200 if args.full else (16 if args.quick else 100)
    axis, maps = basin_maps(grid_n)
    # Many flows of the full model cost many times one: smaller data for them.
    n_members, ens_data = (64, (128, 16, 600.0)) if args.full else (8, (64, 16, 300.0))
    if args.quick:
        n_members, ens_data = 2, (32, 8, 20.0)
    inits = init_ensembles(n_members, *ens_data)
    unigram, entropy_rate = markov_reference_losses(P, Q)
    result = {
        "reference": {"unigram": unigram, "entropy_rate": entropy_rate},
        "canonical": {
            f"({e0}, {w0})": {
                "final_loss": float(traj.loss[-1]),
                "final": {k: float(v) for k, v in traj.final.items()},
                "energy_drift": float(
                    np.ptp(
                        np.asarray(markov_energy(traj.params["e"], traj.params["w"]))
                    )
                ),
            }
            for (e0, w0), traj in zip(WORKED_CASES, flows, strict=True)
        },
        "full_model": {
            init: {
                "train_loss": float(traj.loss[-1]),
                "held_out_loss": held,
                "num_steps": traj.stats["num_steps"],
            }
            for init, (traj, held) in runs.items()
        },
        "basins": {
            f"p={p}, q={q}": {
                "grid": f"{grid_n} x {grid_n}",
                "fractions": found.fractions,
                "agree_with_separatrix": float(np.mean((found.labels == 1) == exact)),
                "wall_time_s": ens.stats["wall_time_s"],
            }
            for (p, q), (found, exact, ens) in maps.items()
        },
        "init_ensembles": {
            "setting": dict(zip(("n_seqs", "seq_len", "t_max"), ens_data, strict=True)),
            **{
                init: {k: v for k, v in row.items() if k != "held_out_losses"}
                for init, row in inits.items()
            },
        },
        "full_model_setting": {
            "d": 8,
            "n_seqs": n_seqs,
            "seq_len": seq_len,
            "t_max": t_max,
        },
    }
    print(json.dumps(result, indent=2))
    gflow.plot.save_versions(
        lambda: figure(model, flows, runs),
        out / "markov_local_to_global",
        paper=args.paper,
    )
    gflow.plot.save_versions(
        lambda: basins_figure(axis, maps, inits),
        out / "markov_basins",
        paper=args.paper,
    )
    (out / "markov_summary.json").write_text(json.dumps(result, indent=2))
    print(
        f"wrote {out}/markov_local_to_global.png, markov_basins.png and "
        "markov_summary.json"
    )
    return result


if __name__ == "__main__":
    main()
