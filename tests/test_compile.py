"""Time to the first answer: one program per solve, holding only what the call uses,
and never compiled again for numbers that change from run to run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import quadratic_problem

import gflow
from gflow import flows


def test_numbers_of_a_run_never_recompile():
    """New save times (number and values), t_max, tolerances, data and initial
    values of the same shapes reuse the compiled program."""
    loss, data, params0, _ = quadratic_problem()
    first = gflow.simulate(loss, data, 1.0, params0=params0, n_save=70)
    assert first.stats["compiled"] and first.stats["programs_compiled"] == 1
    changes = [
        # Any number of save times up to 1,024, given by count or as times.
        *(dict(n_save=n) for n in (2, 57, 101, 300, 1000)),
        *(dict(ts=np.linspace(0.0, 1.0, n) ** 2) for n in (2, 57, 101, 300, 1000)),
        dict(ts=np.linspace(0.0, 2.0, 90) ** 2 / 2.0, t_max=2.0),
        dict(spacing="linear", t_max=3.0, rtol=1e-8, atol=1e-10),
        dict(data=jax.tree.map(lambda x: 2 * x, data)),
        dict(params0=jax.tree.map(lambda x: x - 0.3, params0)),
        dict(max_steps=5000),
    ]
    for change in changes:
        kwargs = dict(data=data, t_max=1.0, params0=params0, n_save=70)
        kwargs.update(change)
        traj = gflow.simulate(loss, kwargs.pop("data"), kwargs.pop("t_max"), **kwargs)
        assert not traj.stats["compiled"], change
        assert traj.stats["programs_compiled"] == 0
    # The saves really are the new ones.
    assert len(traj.ts) == 70 and traj.params["layer"]["w"].shape == (70, 2, 2)


def test_a_flows_learning_rate_and_gradient_descent_never_recompile():
    loss, data, params0, _ = quadratic_problem()
    kwargs = dict(params0=params0, n_save=9)
    gflow.simulate(loss, data, 1.0, flow=flows.ModifiedGD(0.1), **kwargs)
    again = gflow.simulate(loss, data, 2.0, flow=flows.ModifiedGD(0.02), **kwargs)
    assert not again.stats["compiled"]
    # Gradient descent: a new learning rate gives new save steps (gd.ts), and a
    # new number of them (lr = 0.001: 1,000 steps); the program is the same.
    first = gflow.gradient_descent(loss, data, 1.0, 0.1, params0=params0)
    assert first.stats["compiled"]
    for lr, t_max in [(0.05, 1.0), (0.0909, 2.0), (0.01, 0.5), (0.001, 1.0)]:
        gd = gflow.gradient_descent(loss, data, t_max, lr, params0=params0)
        assert not gd.stats["compiled"], lr
        flow = gflow.simulate(loss, data, float(gd.ts[-1]), params0=params0, ts=gd.ts)
        assert gflow.compare(flow, gd).max_param_distance < 0.1
    sgd = optax.sgd(0.05)
    gflow.gradient_descent(loss, data, 1.0, 0.05, params0=params0, optimizer=sgd)
    again = gflow.gradient_descent(
        loss, data, 2.0, 0.05, params0=params0, optimizer=sgd
    )
    assert not again.stats["compiled"]


def stiff_quadratic(eigenvalues):
    """½ θᵀ diag(λ) θ from θ = 1: θ(t) = exp(−λ t)."""
    curvature = jnp.asarray(eigenvalues)

    def loss(theta, data):
        return 0.5 * jnp.sum(curvature * theta**2)

    return loss, jnp.ones(len(eigenvalues))


def test_auto_compiles_its_stabilized_method_only_when_the_flow_stiffens():
    loss, theta0 = stiff_quadratic([0.5, 1.0, 2.0])
    calm = gflow.simulate(loss, None, 3.0, params0=theta0)
    assert calm.stats["programs_compiled"] == 1  # Tsit5's program alone
    assert calm.stats["num_hvp_evals"] == 0
    loss, theta0 = stiff_quadratic([1.0, 3e3])
    stiff = gflow.simulate(loss, None, 5.0, params0=theta0, rtol=1e-6)
    assert stiff.stats["programs_compiled"] == 2  # then the stabilized program
    assert stiff.stats["num_hvp_evals"] > 0
    np.testing.assert_allclose(stiff.final[0], np.exp(-5.0), rtol=1e-4)
    # Solved to the end in segments, each mode's program from the last's state:
    # the same steps as a run that never leaves the stabilized program would take
    # are not asked for here, only that the answer and the counts are right.
    assert stiff.stats["num_steps"] < 500


def test_an_ensemble_of_auto_compiles_both_methods_in_one_program():
    """An ensemble's lanes in both modes need the program of both methods, which
    holds Tsit5's: it is the only one compiled, stiff lanes or not."""
    loss, theta0 = stiff_quadratic([1.0, 3e3])
    scale = jnp.array([1.0, 0.5])
    params0 = scale[:, None] * theta0
    stiff = gflow.simulate_ensemble(loss, None, 5.0, params0=params0, rtol=1e-6)
    assert stiff.stats["programs_compiled"] == 1
    assert np.all(stiff.stats["num_hvp_evals"] > 0)  # every member went stiff
    np.testing.assert_allclose(stiff.final[:, 0], np.exp(-5.0) * scale, rtol=1e-4)
    # Each member is its own `simulate`, which took the same stabilized steps in a
    # program per method.
    one = gflow.simulate(loss, None, 5.0, params0=params0[1], rtol=1e-6)
    assert one.stats["programs_compiled"] == 2
    assert stiff.stats["num_steps"][1] == one.stats["num_steps"]


def test_auto_costs_no_more_than_tsit5_where_the_stabilized_method_does_not_pay():
    """Stiff enough to bind Tsit5's steps, but at rtol 1e-8 the second-order
    stabilized steps must be so short that they cost about as much: auto tries
    them (even for a run this short: min_steps=0), and goes back to Tsit5 where
    they do not pay. At its default, it would not even try: too few steps are
    left to win back the stabilized method's compilation."""
    eigenvalues = np.array([1.0, 100.0])
    loss, theta0 = stiff_quadratic(eigenvalues)
    kwargs = dict(params0=theta0, rtol=1e-8, atol=1e-10, n_save=5)
    tsit5 = gflow.simulate(loss, None, 10.0, solver="tsit5", **kwargs)
    default = gflow.simulate(loss, None, 10.0, **kwargs)
    assert default.stats["num_hvp_evals"] == 0
    assert default.stats["num_grad_evals"] == tsit5.stats["num_grad_evals"]
    auto = gflow.simulate(
        loss, None, 10.0, solver=gflow.AutoTsit5(min_steps=0), **kwargs
    )

    def equivalents(traj):
        return traj.stats["num_grad_evals"] + 2 * traj.stats["num_hvp_evals"]

    assert auto.stats["num_hvp_evals"] > 0  # it did try
    assert equivalents(auto) <= 1.15 * equivalents(tsit5)
    # Its global error, relative to the initial |θ| = 1, stays near the tolerance.
    np.testing.assert_allclose(auto.final, np.exp(-10.0 * eigenvalues), atol=1e-8)


@pytest.mark.parametrize("tqdm_installed", [False, True])
def test_progress_is_plain_text_and_needs_no_tqdm(capsys, monkeypatch, tqdm_installed):
    import sys

    if not tqdm_installed:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` fails
    loss, data, params0, _ = quadratic_problem()
    traj = gflow.simulate(loss, data, 1.5, params0=params0, progress=True, n_save=11)
    err = capsys.readouterr().err
    assert traj.result == "successful"
    assert "t = 1.5 of 1.5 (100.00%)" in err
    assert "steps" in err and "auto (tsit5)" in err
