"""gflow.plot draws what it is given and returns the Axes."""

import matplotlib

matplotlib.use("Agg")

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import quadratic_problem  # noqa: E402

import gflow  # noqa: E402


def test_loss_and_series():
    loss, data, params0, _ = quadratic_problem()
    traj = gflow.simulate(loss, data, 2.0, params0=params0, n_save=11)
    ax = gflow.plot.loss([traj, traj[:5]], ["flow", "head"])
    assert len(ax.lines) == 2 and ax.get_xscale() == "log"
    # t = 0 cannot sit on a log axis: the first save is left out there.
    np.testing.assert_allclose(ax.lines[0].get_xdata(), np.asarray(traj.ts)[1:])
    ax = gflow.plot.series(
        traj.ts,
        np.stack([traj.loss, traj.grad_norm], 1),
        label=["loss", "|grad|"],
        log_time=False,
    )
    assert [line.get_label() for line in ax.lines] == ["loss", "|grad|"]
    assert len(ax.lines[0].get_xdata()) == len(traj)
    plt.close("all")


def test_phases_shading_and_row_similarity():
    ts = np.array([0.0, 0.1, 1.0, 10.0])
    found = gflow.Phases(
        0.1, None, ("phase 1", "phase 1", "phase 2", "phase 2"), {}, ts, True, "found"
    )
    none = gflow.Phases(None, None, ("no phases",) * 4, {}, ts, False, "none")
    _, ax = plt.subplots()
    ax.plot(ts[1:], ts[1:])
    ax.set_xscale("log")
    gflow.plot.phases(ax, none)
    assert len(ax.patches) == 0
    gflow.plot.phases(ax, found)
    assert [p.get_label() for p in ax.patches] == ["phase 1", "phase 2"]
    # Rows condensed onto ± one direction form two blocks after reordering.
    matrix = jnp.array([[1.0, 0.1], [-1.0, 0.0], [2.0, 0.1], [-3.0, -0.2]])
    _, image = gflow.plot.row_similarity(matrix)
    sim = image.get_array()
    signs = np.sign(sim[0])
    assert np.all(signs[:2] == signs[0]) and np.all(signs[2:] == -signs[0])
    plt.close("all")


def test_phase_portrait_and_basin_map_draw_what_they_are_given():
    import matplotlib.pyplot as plt

    model = gflow.models.MarkovCanonical(0.5, 0.8)
    flow = gflow.simulate(
        model, None, 50.0, params0={"e": jnp.array(0.1), "w": jnp.array(-1.0)}
    )
    ax = gflow.plot.phase_portrait(
        model,
        ("e", "w"),
        (0, 2),
        (-2, 1.5),
        trajectories=[flow],
        labels=["flow"],
        invariant=gflow.models.markov_energy,
    )
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), flow.params["e"])
    assert ax.get_xlabel() == "e" and ax.get_ylabel() == "w"
    plt.close(ax.figure)

    x, y = np.array([0.0, 1.0]), np.array([0.0, 1.0, 2.0])
    labels = np.array([0, 1, 1, 0, -1, 1])
    exact = np.array([False, True, True, True, False, True])
    ax = gflow.plot.basin_map(x, y, labels, names=("a", "b"), exact=exact)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["a", "b", "unresolved", "analytical boundary", "disagree"]
    (marks,) = [ln for ln in ax.get_lines() if ln.get_marker() == "x"]
    np.testing.assert_array_equal(marks.get_xdata(), [1.0])  # grid point (1, 0)
    plt.close(ax.figure)


def test_model_figures_plot_what_the_parameters_say():
    import jax

    from gflow.models import CooccurrenceTransformer, cooccurrence_data

    model = CooccurrenceTransformer(d=8, L=3, m=4, m1=6)
    data = cooccurrence_data(jax.random.key(0), n=12, L=3, d=8)
    traj = gflow.simulate(model, data, 2.0, key=1, n_save=5)
    ax = gflow.plot.attention_scores(traj, model, {"s": (1, 0)}, relative=False)
    kq = np.asarray(traj.params["W_K"][:, :, 1] * traj.params["W_Q"][:, :, 0]).sum(1)
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), kq[1:], rtol=1e-10)
    plt.close(ax.figure)

    ax = gflow.plot.group_losses(traj, model, data)
    total, *groups = ax.get_lines()[:5]
    np.testing.assert_allclose(total.get_ydata(), traj.loss[1:])
    expected = model.group_losses(jax.tree.map(lambda x: x[-1], traj.params), data)
    last = [line.get_ydata()[-1] for line in groups]
    np.testing.assert_allclose(last, expected, rtol=1e-10)
    plt.close(ax.figure)

    ax = gflow.plot.effective_rank(traj, ["W_Q"])
    np.testing.assert_allclose(
        ax.get_lines()[0].get_ydata()[0],
        gflow.metrics.effective_rank(traj.params["W_Q"][0]),
        rtol=1e-10,
    )
    plt.close(ax.figure)


def test_work_precision_joins_each_family_in_order_of_work():
    rows = [
        {"family": "flow", "grad_evals": 300, "error": 1e-7},
        {"family": "GD", "grad_evals": 3000, "error": 1e-2},
        {"family": "flow", "grad_evals": 100, "error": 1e-4},
        {"family": "GD", "grad_evals": 30000, "error": float("nan")},
    ]
    ax = gflow.plot.work_precision(rows, title="t")
    flow, gd = ax.get_lines()
    np.testing.assert_array_equal(flow.get_xdata(), [100, 300])
    np.testing.assert_array_equal(gd.get_xdata(), [3000])  # NaN errors left out
    assert ax.get_xscale() == ax.get_yscale() == "log"
    plt.close(ax.figure)


def test_loss_shades_the_phases_it_is_given():
    import jax

    from gflow.models import CooccurrenceTransformer, cooccurrence_data

    model = CooccurrenceTransformer(d=16, L=3, m=8, m1=16)
    data = cooccurrence_data(jax.random.key(0), n=24, L=3, d=16)
    ts = gflow.save_times(5.0, 61, t_first=1e-3)
    traj = gflow.simulate(model, data, 5.0, key=1, ts=ts)
    found = gflow.detect_phases(traj, model, data)
    ax = gflow.plot.loss(traj, "flow", phases=found)
    assert found.found  # Phase 1 ends at t1 = 1.82 on this small model
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["flow", "phase 1", "phase 2"]
    assert any(
        abs(line.get_xdata()[0] - found.t1) < 1e-12 for line in ax.get_lines()[1:]
    )
    plt.close(ax.figure)


def test_edge_of_stability_draws_the_iterates_and_each_flow():
    """GD at lr 0.3 on ½(x² + 8y²) (lr·8 = 2.4: y past the edge) against the
    gradient flow and the rod flow: what each panel holds, from the data."""
    a = jnp.asarray([1.0, 8.0])

    def loss(params, data):
        return 0.5 * jnp.sum(a * params["x"] ** 2)

    lr, p0 = 0.3, {"x": jnp.asarray([1.0, 1e-3])}
    ts = np.arange(21) * lr
    gd = gflow.gradient_descent(loss, None, ts[-1], lr=lr, params0=p0, ts=ts)
    flows = {
        "gradient flow": gflow.simulate(loss, None, ts[-1], params0=p0, ts=ts),
        "rod flow": gflow.simulate(
            loss, None, ts[-1], params0=p0, ts=ts, flow=gflow.flows.RodFlow(lr)
        ),
    }
    sharpness = np.full(len(ts), 8.0)
    fig, (ax_loss, ax_sharp, ax_dist) = gflow.plot.edge_of_stability(
        gd, flows, lr=lr, sharpness=sharpness, smoothing=2
    )
    labels = [line.get_label() for line in ax_loss.get_lines()]
    assert labels == [
        "iterates", "iterates, smoothed (2 steps)", "gradient flow", "rod flow",
        "rod flow: predicted loss",
    ]  # fmt: skip
    np.testing.assert_allclose(ax_loss.get_lines()[0].get_xdata(), np.arange(21))
    np.testing.assert_allclose(ax_sharp.get_lines()[0].get_ydata(), lr * sharpness)
    assert ax_sharp.get_lines()[-1].get_ydata()[0] == 2.0  # the edge
    # One distance curve per flow: GD's midpoints, rows 1 .. 19.
    assert [len(line.get_xdata()) for line in ax_dist.get_lines()] == [19, 19]
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one flow"):
        gflow.plot.edge_of_stability(gd, {}, lr=lr)
