"""The benchmarks' results as the docs show them: Markdown tables made from a
results JSON alone, so that a rerun updates the page that includes them (and a
test holds the written table to its JSON). No side effects on import."""

from __future__ import annotations


def optimizer_edges(payload: dict) -> str:
    """The results as the docs show them (Markdown), from the JSON alone: the
    page includes this file, so a rerun updates it."""
    date = payload["date"]
    lines = [
        f"*Measured by `benchmarks/optimizer_edges.py` on {date} "
        f"({payload['machine']['backend']}, float64; "
        f"`benchmarks/results/optimizer_edges_{payload['machine']['backend']}"
        ".json`).*",
        "",
        "**Gradient descent: rod flow and central flow.** Distance ratio: the "
        "median, after the edge, of ‖GD midpoint − flow‖ / ‖GD midpoint − "
        "gradient flow‖.",
        "",
        "| network | flow | distance ratio | predicted loss gap | warm | cold "
        "| gradients | HVPs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    restarted = []
    for name, row in payload["gradient_descent"].items():
        for kind, label in (("rod", "RodFlow"), ("central", "CentralFlow")):
            r = row[kind]
            lines.append(
                f"| {name} (lr {row['lr']:g}, edge at step {row['edge_step']}) "
                f"| {label} | {r['median_distance_ratio']:.3f} "
                f"| {100 * r['predicted_loss_gap_median']:.1f}% "
                f"| {r['warm_s']:.2f} s | {r['cold_s']:.1f} s | {r['grads']:,} "
                f"| {r['hvps']:,} |"
            )
        ratio = row["rod restarted at the edge"]["median_distance_ratio"]
        restarted.append(f"{ratio:.3f} on {name}")
    lines += [
        "",
        "The rod flow restarted from GD's iterate at the edge (its half-vector "
        f"half of GD's next step there): distance ratio {', '.join(restarted)}.",
        "",
        "**Adaptive methods: rod flow against stable flow.** Distance ratio: the "
        "median, after the edge, of ‖midpoint − rod flow‖ / ‖midpoint − stable "
        "flow‖, both flows from the start, or both restarted from the "
        "optimiser's state at the edge, over the saves where the stable flow "
        "still runs (past the edge it may stall, stiff). λ/edge: the median, "
        "after the edge, of λ_max(P⁻¹H) over the optimiser's edge.",
        "",
        "| network, optimiser | edge at step | ratio from the start "
        "| ratio restarted at the edge | λ/edge: iterates | rod flow "
        "| stable flow |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in payload["adaptive"].items():
        sharp = row["sharpness_over_edge"]

        def cell(start, row=row):
            if start not in row:
                return "–"
            result = row[start]
            compared = result["saves_compared"]
            return f"{result['median_distance_ratio']:.3f} ({compared} saves)"

        def median(kind, sharp=sharp):
            value = sharp[kind]["median_after_edge"]
            return "–" if value is None else f"{value:.2f}"

        lines.append(
            f"| {name} (lr {row['lr']:g}) | {row['edge_step']} "
            f"| {cell('from the start')} | {cell('restarted at the edge')} "
            f"| {median('iterates')} | {median('rod')} | {median('stable')} |"
        )
    lines += [
        "",
        "**Edges.** The largest lr/P whose optax steps on ½x² do not grow "
        "(bisection), against `stability_limit()`:",
        "",
        "| optimiser | measured | formula |",
        "|---|---:|---:|",
    ]
    for name, row in payload["edges"].items():
        lines.append(f"| {name} | {row['measured']:.4f} | {row['formula']:.4f} |")
    scaling = payload["adam_stable_scaling"]
    distances = ", ".join(
        f"{r['distance']:.2e} at lr {r['lr']:g}" for r in scaling["rows"]
    )
    lines += [
        "",
        f"**Adam's stable flow is first order:** its distance to Adam, "
        f"{distances}: {scaling['quarter_lr_ratio']:.2f}× at a quarter of the "
        "learning rate.",
    ]
    return "\n".join(lines) + "\n"


def central_rmsprop(payload: dict) -> str:
    """RMSProp's central flow against the authors' code, as the docs show it
    (Markdown), from the JSON alone."""
    backend = payload["machine"]["backend"]
    eps = f"{payload['eps']:g}".replace("e-0", "e-")  # 1e-8, not 1e-08
    lines = [
        f"*Measured by `benchmarks/central_rmsprop.py` on {payload['date']} "
        f"({backend}, float64; `benchmarks/results/central_rmsprop_{backend}"
        f".json`). RMSProp with b2 = {payload['b2']:g}, ε = {eps} outside the "
        "root, 1,000 steps from ν0 = g0². Distance ratio: the median, after the "
        "edge, of ‖RMSProp midpoint − central flow‖ / ‖RMSProp midpoint − "
        "stable flow‖; cold: the first call in a process (compiling), warm: "
        "the second.*",
        "",
        "| network | central flow | tracked (most) | distance ratio | warm | cold |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in ("port example", "digits"):
        row = payload[name]
        label = f"{name} (lr {row['lr']:g}, edge at step {row['edge_step']})"
        flows = [("gflow", row["gflow"])]
        if "port" in row:
            flows.append(("the authors' code", row["port"]))
        for flow, r in flows:
            lines.append(
                f"| {label} | {flow} | {row['tracked_most']} "
                f"| {r['median_distance_ratio']:.3f} | {r['warm_s']:.1f} s "
                f"| {r['cold_s']:.1f} s |"
            )
        if "speedup" in row:
            s = row["speedup"]
            lines.append(
                f"| {label} | gflow's speed-up | | | {s['warm']:.1f}× "
                f"| {s['cold']:.1f}× |"
            )
    return "\n".join(lines) + "\n"


def program_size(payload: dict) -> str:
    """What each feature adds to a compiled program, as docs/compilation.md shows
    it (Markdown), from the JSON alone."""
    backend = payload["machine"]["backend"]
    lines = [
        f"*Measured by `benchmarks/program_size.py` on {payload['date']} "
        f"({backend}; `benchmarks/results/program_size_{backend}.json`): "
        f"{payload['problem']}, each configuration compiled in a fresh process "
        "with the cache off. Kernels and IR: the largest program's, as XLA "
        "compiles it; compile: gflow's `compile_time_s` (the hand-written "
        "solves: their first call less their second).*",
        "",
        "| configuration | kernels | optimised IR | compile | first call |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, what in payload["configs"].items():
        if name not in payload["rows"]:
            continue
        r = payload["rows"][name]
        lines.append(
            f"| {what} | {r['kernels']} | {r['ir_mb']:.2f} MB "
            f"| {r['compile_s']:.2f} s | {r['first_s']:.2f} s |"
        )
    return "\n".join(lines) + "\n"
