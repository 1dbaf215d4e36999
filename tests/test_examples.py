"""Each example runs end to end (in a fast setting) and writes its figures."""

import importlib.util
import json
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(tmp_path):
    flow, gd = load("quickstart").main(["--out", str(tmp_path)])
    assert (tmp_path / "quickstart.png").stat().st_size > 10_000
    assert flow.result == "successful" and float(flow.loss[-1]) < 1e-5
    assert gd.stats["num_steps"] == 80


def test_cooccurrence_phases(tmp_path):
    result = load("cooccurrence_phases").main(["--t-max", "5", "--out", str(tmp_path)])
    assert (tmp_path / "cooccurrence_phases.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "cooccurrence_summary.json").read_text())
    assert saved["t1"] == result["t1"] < 1.0
    assert result["key_query_drift_at_t1"] < 0.01


@pytest.mark.slow
def test_markov_local_to_global(tmp_path):
    result = load("markov_local_to_global").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "markov_local_to_global.png").stat().st_size > 10_000
    canonical = result["canonical"]
    entropy_rate = result["reference"]["entropy_rate"]
    assert abs(canonical["(1.5, -0.3)"]["final_loss"] - entropy_rate) < 1e-5
    assert (tmp_path / "markov_basins.png").stat().st_size > 10_000
    for basin in result["basins"].values():
        assert basin["agree_with_separatrix"] == 1.0  # 16 x 16 grid, none near it


def test_condensation_rank_collapse(tmp_path):
    result = load("condensation_rank_collapse").main(["--out", str(tmp_path)])
    for name in ("condensation_dynamics.png", "condensation_heatmaps.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert result["condensed_at"] < result["rank_collapse_at"]
    assert result["W_Q_effective_rank"]["at_collapse"] < 1.6


def test_flow_vs_gradient_descent(tmp_path):
    summary = load("flow_vs_gradient_descent").main(
        ["--t-max", "3", "--out", str(tmp_path)]
    )
    assert (tmp_path / "flow_vs_gradient_descent.png").stat().st_size > 10_000
    gd = summary["gradient_descent"]
    # The smaller the learning rate, the closer GD stays to the flow.
    assert gd["0.03"]["max_param_distance"] < gd["0.1"]["max_param_distance"]


@pytest.mark.slow
def test_edge_of_stability(tmp_path):
    summary = load("edge_of_stability").main(["--steps", "600", "--out", str(tmp_path)])
    assert (tmp_path / "edge_of_stability.png").stat().st_size > 10_000
    assert 300 < summary["edge_step"] < 500  # GD reaches the edge near step 400
    assert summary["max_effective_sharpness_central"] <= 2 * (1 + 1e-2)
    # GD's midpoints stay closer to the central flow than to the gradient flow.
    central = summary["final_distance_to_central_flow"]
    assert central < 0.5 * summary["final_distance_to_gradient_flow"]


@pytest.mark.slow
def test_adam_edge(tmp_path):
    summary = load("adam_edge").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "adam_edge.png").stat().st_size > 10_000
    far = summary["final_distance"]
    # 300 steps end before Adam's edge: the rod has not opened, so it is the
    # stable flow, and both are far closer to Adam than the gradient flow.
    assert far["rod flow"] == pytest.approx(far["stable flow"], rel=0.05)
    assert far["stable flow"] < 0.2 * far["gradient flow"]
