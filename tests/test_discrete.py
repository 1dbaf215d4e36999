"""gradient_descent and compare: GD on the flow's time axis."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import quadratic_problem, tree_max_abs_diff

import gflow


def optax_steps(loss, data, params0, optimizer, steps):
    """Hand-written optax loop: the iterate after each step."""
    params, state = params0, optimizer.init(params0)
    out = [params]
    for _ in range(steps):
        updates, state = optimizer.update(jax.grad(loss)(params, data), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def test_equals_hand_written_sgd_and_euler_flow():
    loss, data, params0, _ = quadratic_problem()
    lr, steps = 0.05, 60
    gd = gflow.gradient_descent(
        loss, data, lr * steps, lr, params0=params0, spacing="linear", n_save=13
    )
    np.testing.assert_allclose(gd.ts, lr * np.arange(0, steps + 1, 5), rtol=1e-12)
    reference = optax_steps(loss, data, params0, optax.sgd(lr), steps)
    for i, t in enumerate(gd.ts):
        k = round(float(t) / lr)
        at_i = jax.tree.map(lambda x, i=i: x[i], gd.params)
        assert tree_max_abs_diff(at_i, reference[k]) < 1e-13
    euler = gflow.simulate(
        loss, data, lr * steps, params0=params0, solver="euler", dt0=lr, ts=gd.ts
    )
    assert tree_max_abs_diff(euler.params, gd.params) < 1e-13
    assert gd.stats["num_steps"] == steps
    # Each saved row reuses its step's gradient; the last row is one more.
    assert gd.stats["num_grad_evals"] == steps + 1
    assert gd.meta["kind"] == "discrete"


def test_saved_rows_are_the_iterates_values():
    """Each row's loss, gradient, metrics and velocity are those of its saved
    parameters, including the rows whose parameters are not kept."""
    loss, data, params0, _ = quadratic_problem()
    metrics = {"first": lambda p, d: jax.tree.leaves(p)[0].sum()}
    kwargs = dict(params0=params0, n_save=7)
    gd = gflow.gradient_descent(
        loss, data, 3.0, 0.05, metrics=metrics, params_at="final", **kwargs
    )
    kept = gflow.gradient_descent(loss, data, 3.0, 0.05, **kwargs)
    for i in range(len(kept)):
        at_i = jax.tree.map(lambda x, i=i: x[i], kept.params)
        value, grads = jax.value_and_grad(loss)(at_i, data)
        np.testing.assert_allclose(gd.loss[i], value, rtol=1e-13)
        norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grads)))
        np.testing.assert_allclose(gd.grad_norm[i], norm, rtol=1e-13)
        np.testing.assert_allclose(
            gd.metrics["first"][i], metrics["first"](at_i, data), rtol=1e-13
        )
        velocity = jax.tree.map(lambda x, i=i: x[i], kept.velocity)
        assert tree_max_abs_diff(velocity, jax.tree.map(jnp.negative, grads)) < 1e-13
    assert tree_max_abs_diff(gd.final, kept.final) == 0


def test_any_optax_optimizer_and_time_per_step():
    loss, data, params0, _ = quadratic_problem()
    lr, momentum, steps = 0.02, 0.9, 50
    optimizer = optax.sgd(lr, momentum=momentum)
    tau = lr / (1 - momentum)
    gd = gflow.gradient_descent(
        loss,
        data,
        tau * steps,
        lr,
        params0=params0,
        optimizer=optimizer,
        time_per_step=tau,
        spacing="linear",
        n_save=11,
    )
    reference = optax_steps(loss, data, params0, optimizer, steps)
    assert tree_max_abs_diff(gd.final, reference[-1]) < 1e-13
    assert abs(float(gd.ts[-1]) - tau * steps) < 1e-12
    assert gd.meta["time_per_step"] == tau


def test_log_save_times_round_to_whole_steps():
    loss, data, params0, _ = quadratic_problem()
    gd = gflow.gradient_descent(loss, data, 10.0, 0.1, params0=params0, n_save=50)
    steps = np.asarray(gd.ts) / 0.1
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    assert np.all(np.diff(steps) > 0)
    assert gd.ts[0] == 0 and abs(float(gd.ts[-1]) - 10.0) < 1e-12


def test_new_data_params_and_lr_do_not_recompile():
    loss, data, params0, _ = quadratic_problem()
    ts = np.linspace(0, 1, 11)
    gflow.gradient_descent(loss, data, 1.0, 0.01, params0=params0, ts=ts)
    again = gflow.gradient_descent(
        loss,
        jax.tree.map(lambda x: 2 * x, data),
        1.0,
        0.02,
        params0=jax.tree.map(lambda x: x + 1, params0),
        ts=ts,
    )
    assert not again.stats["compiled"]


def test_compare():
    loss, data, params0, exact = quadratic_problem()
    same = gflow.simulate(loss, data, 2.0, params0=params0, n_save=21)
    c = gflow.compare(same, same)
    assert c.max_param_distance == 0 and c.max_loss_gap == 0
    assert c.first_difference_time is None
    # Parameters starting at zero: the distance there is 0, not 0/0.
    zero = jax.tree.map(jnp.zeros_like, params0)
    gd0 = gflow.gradient_descent(loss, data, 1.0, 0.1, params0=zero, n_save=5)
    flow0 = gflow.simulate(loss, data, 1.0, params0=zero, ts=gd0.ts)
    c0 = gflow.compare(flow0, gd0)
    assert c0.param_distance[0] == 0 and np.all(np.isfinite(c0.param_distance))
    # GD departs from the flow by O(lr): ten times the rate, ten times the distance.
    distances = []
    for lr in (0.01, 0.001):
        gd = gflow.gradient_descent(loss, data, 2.0, lr, params0=params0, n_save=21)
        flow = gflow.simulate(loss, data, 2.0, params0=params0, ts=gd.ts, rtol=1e-10)
        c = gflow.compare(flow, gd, tol=1e-3)
        assert len(c.ts) == len(gd.ts)
        distances.append(c.max_param_distance)
    assert 8 < distances[0] / distances[1] < 12
    coarse = gflow.gradient_descent(loss, data, 2.0, 0.2, params0=params0, ts=gd.ts)
    c = gflow.compare(flow, coarse, tol=1e-2)
    assert c.first_difference_time is not None
    first = np.argmax(c.param_distance > 1e-2)
    assert c.first_difference_time == c.ts[first] and np.all(
        c.param_distance[:first] <= 1e-2
    )


def test_divergence_is_reported():
    loss, data, params0, _ = quadratic_problem()  # top eigenvalue 5: GD needs lr < 0.4
    gd = gflow.gradient_descent(loss, data, 500.0, 1.0, params0=params0, throw=False)
    assert gd.result == "diverged"
    assert np.all(np.isfinite(gd.loss)) and float(gd.ts[-1]) < 500.0
    with pytest.raises(gflow.SimulationError, match="lower it"):
        gflow.gradient_descent(loss, data, 500.0, 1.0, params0=params0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=0.0), ValueError, "`lr` must be a positive"),
        (dict(lr=float("inf")), ValueError, "`lr` must be a positive"),
        (dict(t_max=0.001), ValueError, "less than one step"),
        (dict(time_per_step=-1.0), ValueError, "`time_per_step`"),
        (dict(optimizer="adam"), TypeError, "optax.GradientTransformation"),
        (dict(lr=None), TypeError, "needs `lr`"),
        (dict(optimizer=gflow.optimizers.Adam(0.1)), ValueError, "optimiser's own"),
        (dict(params0=None), ValueError, "`params0` is required"),
        (dict(ts=[0.0, 0.5]), ValueError, "`ts` must end at t_max"),
        (dict(metrics={"m": 1}), TypeError, "`metrics` must be a dict"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    loss, data, params0, _ = quadratic_problem()
    args = dict(t_max=1.0, lr=0.01, params0=params0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        gflow.gradient_descent(loss, data, args.pop("t_max"), args.pop("lr"), **args)


def test_compare_rejects_mismatches():
    loss, data, params0, _ = quadratic_problem()
    a = gflow.simulate(loss, data, 1.0, params0=params0, n_save=5)
    b = gflow.simulate(loss, data, 1.7, params0=params0, n_save=3, spacing="linear")
    with pytest.raises(ValueError, match="fewer than two save times"):
        gflow.compare(a, b)
    other = gflow.simulate(lambda p, d: jnp.sum(p**2), None, 1.0, params0=jnp.ones(3))
    with pytest.raises(ValueError, match="different parameter structures"):
        gflow.compare(a, other)


def test_float32_runs_keep_their_moments_in_float32_under_x64():
    """The saved moments' buffer has the parameters' dtype, also for a run
    with no moments (plain gradient descent), under x64 as in these tests."""
    params0 = {"x": jnp.ones(3, jnp.float32)}

    def loss(params, data):
        return jnp.sum(params["x"] ** 2)

    plain = gflow.gradient_descent(loss, None, 0.1, lr=0.01, params0=params0)
    assert plain.state == {} and plain.params["x"].dtype == jnp.float32
    adam = gflow.optimizers.Adam(0.01)
    run = gflow.gradient_descent(loss, None, 0.1, optimizer=adam, params0=params0)
    assert run.state["v"]["x"].dtype == jnp.float32
