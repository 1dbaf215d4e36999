"""Small versions of the benchmark scripts: they run and their peers are correct.

Timing is not asserted here (that is what the benchmarks measure); only that the
scripts work and that the peer stepping rules integrate the flow they claim to.
"""

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


def load(name):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (equinox Modules) look their module up
    spec.loader.exec_module(module)
    return module


def test_peer_stepping_rules_follow_the_flow():
    flow_vs_gd = load("flow_vs_gd")
    a = jnp.diag(jnp.array([0.5, 1.0, 4.0]))
    x0 = jnp.array([1.0, -1.0, 0.5])
    ts = jnp.array([0.0, 0.3, 0.6, 1.2, 2.4])

    def grad(x):
        return a @ x

    exact = np.stack([scipy.linalg.expm(-float(t) * np.asarray(a)) @ x0 for t in ts])
    refresh, power_iters = 10, 10
    saved, evals = jax.jit(
        lambda x: flow_vs_gd.rk4_sharpness(grad, x, ts, refresh, power_iters)
    )(x0)
    # dt = 1/λ_max = 0.25, so hλ = 1 on the fastest mode: one RK4 step multiplies
    # it by 1 − 1 + 1/2 − 1/6 + 1/24 = 0.375 instead of e^{−1} = 0.3679, an error
    # of 0.5 * 0.0071 = 0.0036 on its initial value 0.5 (decaying afterwards).
    assert np.max(np.abs(np.asarray(saved) - exact)) < 0.0036
    # Four gradients a step, and every `refresh` steps a power iteration of
    # power_iters + 1 Hessian-vector products (two gradients' worth each).
    fewest = int(np.ceil(2.4 / 0.25))
    most = fewest + len(ts) - 1  # landing on save times adds short steps
    per_refresh = 2 * (power_iters + 1)
    assert 4 * fewest + per_refresh <= int(evals)
    assert int(evals) <= 4 * most + per_refresh * int(np.ceil(most / refresh))
    saved, evals = jax.jit(lambda x: flow_vs_gd.adaptive_euler(grad, x, ts))(x0)
    assert np.max(np.abs(np.asarray(saved) - exact)) < 5e-2
    assert int(evals) > 10


def test_flow_vs_gd_runs(tmp_path):
    results = load("flow_vs_gd").main(
        [
            "--problems",
            "quadratic",
            "--quick",
            "--results",
            str(tmp_path),
            "--figures",
            str(tmp_path),
        ]
    )
    rows = {r["method"]: r for r in results["quadratic"]["rows"]}
    # Tighter tolerances give smaller errors; GD's error shrinks with its rate.
    assert (
        rows["gflow tsit5 rtol=1e-08"]["error"]
        < rows["gflow tsit5 rtol=0.0001"]["error"]
    )
    assert rows["GD lr=0.03"]["error"] < rows["GD lr=0.1"]["error"]
    assert rows["GD lr=0.1"]["grad_evals"] == 300
    saved = json.loads(
        (tmp_path / f"flow_vs_gd_{jax.default_backend()}.json").read_text()
    )
    assert (
        saved["problems"]["quadratic"]["rows"][0]["method"] == "gflow tsit5 rtol=0.0001"
    )
    assert (
        tmp_path / f"flow_vs_gd_{jax.default_backend()}.png"
    ).stat().st_size > 10_000


@pytest.mark.slow
def test_overhead_runs(tmp_path):
    overhead = load("overhead")
    data, params0 = overhead.make_problem()
    sizes = overhead.SIZES  # weights and biases of each layer
    layers = zip(sizes[:-1], sizes[1:], strict=True)
    n_params = sum((n_in + 1) * n_out for n_in, n_out in layers)
    assert sum(x.size for x in jax.tree.leaves(params0)) == n_params
    overhead.main(["--t-max", "1", "--repeats", "1", "--results", str(tmp_path)])
    saved = json.loads(
        (tmp_path / f"overhead_{jax.default_backend()}.json").read_text()
    )
    rows = saved["results"]
    assert rows["parameters"] == n_params
    # The ratio is run time per gradient over one bare gradient's time.
    expected = rows["simulate_run_s"] / (rows["num_grad_evals"] * rows["bare_grad_s"])
    assert np.isclose(rows["overhead_ratio"], expected, rtol=1e-12)
    # Tsit5 (FSAL): six gradients a step, one to pick the first step (the other
    # is the first row's), one per row.
    assert rows["num_solver_grad_evals"] == 6 * rows["num_steps"] + 1
    assert saved["compile_s"].keys() == overhead.compile_cases().keys()


def test_peers_torchdiffeq_runs(tmp_path):
    pytest.importorskip("torch", reason="the 'peers' extra is not installed")
    pytest.importorskip("torchdiffeq", reason="the 'peers' extra is not installed")
    rows = load("peers_torchdiffeq").main(["--quick", "--results", str(tmp_path)])
    by_method = {(r["method"], r["rtol"]): r for r in rows}
    # All three solve the same flow: errors at the solvers' tolerance level.
    for (method, rtol), row in by_method.items():
        assert row["error"] < 1e3 * rtol, method


@pytest.mark.slow
def test_ensemble_benchmark_runs_and_labels_agree(tmp_path):
    out = load("ensemble").main(["--quick", "--results", str(tmp_path)])
    (grid,) = out["grids"]
    assert grid["members"] == 144
    runs = {run["way"]: run for run in grid["gflow"]}  # one device count (quick)
    assert len(runs) == len(grid["gflow"]) == 2
    for way, run in runs.items():
        # Every point gets the label the straightforward solve gives it.
        assert run["same_labels"] == 144, way
        assert run["member_steps"] <= run["lane_steps"]
    # Without a stopping rule every member runs to t_max: gflow's members take no
    # fewer steps than with the rule.
    default, stopping = runs["gflow default"], runs["gflow stopping"]
    assert default["member_steps"] > stopping["member_steps"]
    assert [row["members"] for row in out["scaling"]] == [64, 256]
    for row in out["scaling"]:
        assert 0 < row["useful_share_until_drained"] <= 1
    saved = json.loads(
        (tmp_path / f"ensemble_quick_{jax.default_backend()}.json").read_text()
    )
    assert saved["grids"][0]["members"] == 144


@pytest.mark.slow
def test_central_classifier_benchmark_runs(tmp_path):
    out = load("central_classifier").main(["--quick", "--results", str(tmp_path)])
    # GD at lr 0.2 brings the 10-class network to the edge near step 75; the
    # central flow holds lr·λ_max there, at the defaults.
    assert 60 <= out["edge_step"] <= 90
    assert 1.99 < out["max_effective_sharpness"] < 2.02
    assert out["most_tracked"] >= 4 and out["most_at_edge"] >= 1
    assert out["work"]["num_third_order_evals"] > 0
    assert 0 < out["median_distance_ratio"] < 2


@pytest.mark.slow
def test_program_size_benchmark_runs(tmp_path):
    out = load("program_size").main(
        ["--only", "hand", "tsit5", "rows", "--results", str(tmp_path)]
    )
    kernels = {name: row["kernels"] for name, row in out["rows"].items()}
    # Save counts are data: 2 and 101 save times compile the same program.
    assert kernels["tsit5"] == kernels["rows"] > kernels["hand"] > 0
    table = (tmp_path / "program_size_cpu.md").read_text()
    assert table.count("\n| ") == 1 + 3  # the header and one row each


@pytest.mark.slow
def test_memory_benchmark_runs(tmp_path):
    out = load("memory").main(["--quick", "--results", str(tmp_path)])
    rows = {(r["width"], r["n_save"], r["params_at"]): r for r in out["rows"]}
    # 4 w² + 4 w parameters; "final" keeps the parameters at two rows.
    assert rows[(200, 100, "final")]["parameters"] == 4 * 200**2 + 4 * 200
    assert rows[(200, 100, "final")]["rows_with_params"] == 2
    assert rows[(200, 100, "all")]["rows_with_params"] == 100
    assert out["target"]["peak_rss_bytes"] > 0


def test_checkpoint_benchmark_runs(tmp_path):
    out = load("checkpoint").main(["--quick", "--results", str(tmp_path)])
    assert out["same_bit_for_bit"]
    assert out["checkpoint_writes"] >= 1


@pytest.mark.slow
def test_stiff_benchmark_runs(tmp_path):
    pytest.importorskip("sklearn", reason="the 'bench' extra is not installed")
    out = load("stiff").main(
        ["--quick", "--results", str(tmp_path), "--figures", str(tmp_path)]
    )
    rows = {r["method"]: r for r in out["rows"]}
    # Gradient-equivalents count each Hessian-vector product as two gradients.
    for row in rows.values():
        assert row["grad_evals"] == row["num_grad_evals"] + 2 * row["num_hvp_evals"]
    assert rows["tsit5 rtol=0.0001"]["num_hvp_evals"] == 0
    assert rows["rkc2 rtol=0.0001"]["num_hvp_evals"] > 0
    # Every adaptive method follows the flow; tighter tolerances, smaller errors.
    for solver in ("tsit5", "rkc2", "rock4", "auto"):
        loose, tight = rows[f"{solver} rtol=0.0001"], rows[f"{solver} rtol=1e-06"]
        assert tight["error"] < loose["error"] < 1e-2, solver
    assert rows["GD lr=0.01"]["num_steps"] == 3000
    # The defaults' sweep point is that run, not a second one.
    assert (
        rows["auto rtol=1e-06"]["run_time_s"] == out["defaults"]["auto"]["run_time_s"]
    )
    # λ_max is the top eigenvalue: positive, and the flow sharpens.
    assert 0 < out["sharpness"]["values"][0] < out["sharpness"]["values"][-1]
    assert out["markov_grid"]["auto"]["max_steps"] > 0
    assert set(out["papers"]) == {"co-occurrence", "Markov transformer", "condensation"}
    assert (
        tmp_path / f"stiff_quick_{jax.default_backend()}.png"
    ).stat().st_size > 10_000


@pytest.mark.slow
def test_optimizer_flows_benchmark_runs(tmp_path):
    pytest.importorskip("sklearn", reason="the 'bench' extra is not installed")
    out = load("optimizer_flows").main(
        ["--quick", "--results", str(tmp_path), "--figures", str(tmp_path)]
    )
    gd, hb = out["gradient_descent"], out["heavy_ball"]
    # Backward error analysis, on a small MLP: the orders hold at these rates.
    assert 0.9 < gd["slope_plain"] < 1.1
    assert gd["slope_modified"] > 1.8
    for row in hb["rows"]:
        assert (
            row["to_heavy_ball_matched"] < row["to_heavy_ball_rest"] < row["to_plain"]
        )
    for sgd in out["sgd"]:
        assert len(sgd["sgd_mean"]) == len(sgd["sde_mean"]) == len(sgd["ts"])
        assert sgd["sde_path_s"] > 0 and sgd["sgd_run_s"] > 0
    assert (
        tmp_path / f"optimizer_flows_quick_{jax.default_backend()}.png"
    ).stat().st_size > 10_000


def test_compile_benchmarks_hand_written_solves_follow_gflows_flow():
    """The hand-written solves compile.py times gflow against solve the same flow,
    for a plain pytree and for an Equinox model (its activation held apart)."""
    import equinox as eqx

    compile_bench = load("compile")
    x = jax.random.normal(jax.random.key(0), (32, 4))
    y = jnp.sin(x[:, :2])
    mlp = eqx.nn.MLP(4, 2, 8, 1, activation=jnp.tanh, key=jax.random.key(1))

    def loss(model, data):
        x, y = data
        return 0.5 * jnp.mean(jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1))

    for params0, loss_fn in [
        (mlp, loss),
        (mlp.layers[0].weight, lambda w, data: jnp.mean((data[0] @ w.T) ** 2)),
    ]:
        hand = compile_bench.hand_calls(loss_fn, (x, y), params0, 2.0)()
        flow = compile_bench.gflow_calls(loss_fn, (x, y), params0, 2.0)()
        assert hand["steps"] > 0
        np.testing.assert_allclose(hand["final_loss"], flow["final_loss"], rtol=1e-4)


@pytest.mark.slow
def test_sharpness_benchmark_runs(tmp_path):
    out = load("sharpness").main(["--quick", "--results", str(tmp_path)])
    # The metric, warm-started with 10 iterations a row inside the flow's program,
    # and sharpness_along (30 a row) agree with 200 iterations (float32).
    assert out["max_relative_error"]["metric"] < 1e-3
    assert out["max_relative_error"]["sharpness_along"] < 1e-4
    assert set(out["warm_s"]) == {"flow", "flow_with_metric", "sharpness_along"}


@pytest.mark.slow
def test_optimizer_edges_runs(tmp_path):
    results = load("optimizer_edges").main(["--quick", "--results", str(tmp_path)])
    # Every optimiser's edge, measured by bisection on optax's own steps, is its
    # formula (to the bisection's 1e-4 on lr/P).
    for name, row in results["edges"].items():
        assert abs(row["measured"] - row["formula"]) < 2e-4, name
    # The rod flow costs two gradients an evaluation, the central flow one plus
    # Hessian-vector products; each is timed and its accuracy measured.
    for row in results["gradient_descent"].values():
        assert row["rod"]["hvps"] == 0 < row["central"]["hvps"]
    backend = jax.default_backend()
    saved = json.loads((tmp_path / f"optimizer_edges_quick_{backend}.json").read_text())
    table = (tmp_path / f"optimizer_edges_quick_{backend}.md").read_text()
    assert table == load("_tables").optimizer_edges(saved)


@pytest.mark.slow
def test_central_rmsprop_benchmark_runs(tmp_path):
    results = load("central_rmsprop").main(["--quick", "--results", str(tmp_path)])
    # Both problems reach RMSProp's edge within 200 steps; the central flow there
    # is measured against the stable flow (the authors' code is skipped: quick).
    for name in ("port example", "digits"):
        row = results[name]
        assert row["edge_step"] is not None, name
        assert row["gflow"]["work"]["num_third_order_evals"] > 0
        assert row["gflow"]["median_distance_ratio"] > 0
        assert "port" not in row
    backend = jax.default_backend()
    saved = json.loads((tmp_path / f"central_rmsprop_quick_{backend}.json").read_text())
    table = (tmp_path / f"central_rmsprop_quick_{backend}.md").read_text()
    assert table == load("_tables").central_rmsprop(saved)
