"""simulate() against closed-form flows, invariants and gradient descent."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import quadratic_problem, stage2_problem, tree_max_abs_diff

import gflow

ADAPTIVE = ["tsit5", "dopri5", "dopri8", "bosh3", "kvaerno5"]


def max_error(traj, exact):
    return max(
        tree_max_abs_diff(
            jax.tree.map(lambda x, i=i: x[i], traj.params), exact(float(t))
        )
        for i, t in enumerate(traj.ts)
    )


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_quadratic_flow_matches_expm(solver):
    loss, data, params0, exact = quadratic_problem()
    traj = gflow.simulate(
        loss, data, 4.0, params0=params0, solver=solver, rtol=1e-9, atol=1e-11
    )
    assert traj.result == "successful"
    assert traj.ts[0] == 0.0 and traj.ts[-1] == 4.0
    assert jax.tree.structure(traj.final) == jax.tree.structure(params0)
    assert max_error(traj, exact) < 1e-7
    # The saved loss is the loss of the saved parameters.
    i = len(traj) // 2
    assert np.isclose(
        traj.loss[i], loss(jax.tree.map(lambda x: x[i], traj.params), data)
    )


@pytest.mark.parametrize("solver", ["tsit5", "dopri8", "bosh3"])
def test_accuracy_improves_with_tolerance(solver):
    loss, data, params0, exact = quadratic_problem(seed=3)
    errors, evals = [], []
    for rtol in (1e-4, 1e-7, 1e-10):
        traj = gflow.simulate(
            loss, data, 4.0, params0=params0, solver=solver, rtol=rtol, atol=rtol * 1e-2
        )
        errors.append(max_error(traj, exact))
        evals.append(traj.stats["num_solver_grad_evals"])
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8
    assert evals[0] < evals[1] < evals[2]


def test_chen_luo_stage2_cosh_sinh():
    loss, F, params0, exact = stage2_problem()
    traj = gflow.simulate(loss, F, 30.0, params0=params0, rtol=1e-10, atol=1e-12)
    for i, t in enumerate(traj.ts):
        at_t = jax.tree.map(lambda x, i=i: x[i], traj.params)
        scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(exact(float(t))))
        assert tree_max_abs_diff(at_t, exact(float(t))) < 1e-8 * scale
    # W_Q / ‖W_Q‖_F collapses toward rank one: σ2/σ1 falls to near 0.
    ratios = [
        np.linalg.svd(np.asarray(q), compute_uv=False)[:2] for q in traj.params["W_Q"]
    ]
    ratios = np.array([s2 / s1 for s1, s2 in ratios])
    assert ratios[-1] < 0.1 * ratios[0]


def test_euler_is_gradient_descent():
    loss, data, params0, _ = quadratic_problem()
    lr, steps = 0.01, 200
    traj = gflow.simulate(
        loss,
        data,
        lr * steps,
        params0=params0,
        solver="euler",
        dt0=lr,
        ts=lr * np.arange(steps + 1),
    )
    opt = optax.sgd(lr)
    params, state = params0, opt.init(params0)
    step = jax.jit(
        lambda p, s: (lambda u, s2: (optax.apply_updates(p, u), s2))(
            *opt.update(jax.grad(loss)(p, data), s)
        )
    )
    for k in range(1, steps + 1):
        params, state = step(params, state)
        if k % 50 == 0:
            at_k = jax.tree.map(lambda x, k=k: x[k], traj.params)
            assert tree_max_abs_diff(at_k, params) < 1e-13
    assert traj.stats["num_steps"] == steps


def test_second_call_does_not_recompile():
    loss, data, params0, _ = quadratic_problem()
    first = gflow.simulate(loss, data, 1.0, params0=params0, n_save=7)
    assert first.stats["compiled"]
    new_data = jax.tree.map(lambda x: 1.5 * x, data)
    new_params0 = jax.tree.map(lambda x: x + 0.1, params0)
    again = gflow.simulate(
        loss, new_data, 2.0, params0=new_params0, n_save=7, rtol=1e-5
    )
    assert not again.stats["compiled"]
    assert again.stats["compile_time_s"] == 0.0
    assert not tree_max_abs_diff(again.final, first.final) < 1e-3  # it really ran


def test_grad_eval_count_is_exact():
    """Count executions of the gradient with a host callback and compare."""
    calls = []

    def loss(params, data):
        x = params["x"]
        jax.debug.callback(lambda _: calls.append(1), x)  # runs once per forward pass
        return 0.5 * jnp.sum(data * x**2) + 0.1 * jnp.sum(jnp.sin(x))

    params0 = {"x": jnp.array([1.0, -2.0, 0.5])}
    data = jnp.array([2.0, 0.5, 1.0])
    cases = [
        dict(solver="tsit5"),
        dict(solver="dopri8", dt0=0.01),
        dict(solver="bosh3", stop_at_grad_norm=1e-3),
        dict(solver="euler", dt0=0.05),
    ]
    for kwargs in cases:
        calls.clear()
        traj = gflow.simulate(loss, data, 3.0, params0=params0, n_save=9, **kwargs)
        assert traj.stats["num_grad_evals"] == len(calls), kwargs


def test_stop_at_loss_lands_on_threshold():
    # L = ½|x|², x(t) = x0 e^{−t}: L(t) = L0 e^{−2t} reaches 0.1 at t = ½ log(10 L0).
    def loss(params, data):
        return 0.5 * jnp.sum(params**2)

    x0 = jnp.array([1.0, 1.0])
    traj = gflow.simulate(loss, None, 10.0, params0=x0, stop_at_loss=0.1, rtol=1e-10)
    assert traj.result == "stopped_at_loss"
    assert abs(float(traj.ts[-1]) - 0.5 * np.log(10.0)) < 1e-8
    assert abs(float(traj.loss[-1]) - 0.1) < 1e-10
    assert np.all(np.diff(np.asarray(traj.ts)) > 0)


def test_stop_at_grad_norm():
    def loss(params, data):
        return 0.5 * jnp.sum(params**2)

    traj = gflow.simulate(loss, None, 50.0, params0=jnp.ones(2), stop_at_grad_norm=1e-3)
    assert traj.result == "stopped_at_grad_norm"
    assert traj.grad_norm[-1] <= 1e-3
    assert traj.grad_norm[-2] > 1e-3
    assert float(traj.ts[-1]) < 50.0


def test_metrics_are_evaluated_on_every_save():
    loss, data, params0, exact = quadratic_problem()

    def first_weight(params, data):
        return params["layer"]["w"][0, 0]

    traj = gflow.simulate(
        loss,
        data,
        2.0,
        params0=params0,
        metrics={"w00": first_weight, "loss": loss},
        rtol=1e-9,
    )
    assert traj.metrics["w00"].shape == traj.ts.shape
    np.testing.assert_allclose(traj.metrics["w00"], traj.params["layer"]["w"][:, 0, 0])
    np.testing.assert_allclose(traj.metrics["loss"], traj.loss)


def test_model_object_with_init_and_key():
    class Quadratic:
        def init(self, key):
            return {"x": jax.random.normal(key, (3,))}

        def loss(self, params, data):
            return 0.5 * jnp.sum((params["x"] - data) ** 2)

    data = jnp.array([1.0, 2.0, 3.0])
    traj = gflow.simulate(Quadratic(), data, 3.0, key=7, rtol=1e-10, atol=1e-12)
    x0 = Quadratic().init(jax.random.key(7))["x"]
    np.testing.assert_allclose(
        traj.final["x"], data + np.exp(-3.0) * (x0 - data), rtol=1e-8
    )
    assert traj.meta["seed"] == 7


def test_float32_by_default_for_float32_params():
    def loss(params, data):
        return 0.5 * jnp.sum((params - data) ** 2)

    traj = gflow.simulate(
        loss, jnp.ones(3, jnp.float32), 2.0, params0=jnp.zeros(3, jnp.float32)
    )
    assert traj.params.dtype == jnp.float32 and traj.ts.dtype == jnp.float32
    np.testing.assert_allclose(traj.final, 1 - np.exp(-2.0), rtol=1e-5)
    with pytest.warns(UserWarning, match="float32") as record:
        gflow.simulate(
            loss,
            jnp.ones(3, jnp.float32),
            0.1,
            params0=jnp.zeros(3, jnp.float32),
            rtol=1e-9,
        )
    assert record[0].filename == __file__  # the user's call, not gflow's inside


def test_log_and_linear_save_times():
    loss, data, params0, _ = quadratic_problem()
    log = gflow.simulate(loss, data, 100.0, params0=params0, n_save=5)
    # 0, then geometric from t_max * 1e-4 = 0.01 to 100 (factor 100^(2/3) per step).
    np.testing.assert_allclose(
        log.ts, [0.0, 0.01, 0.01 * 10 ** (4 / 3), 100 / 10 ** (4 / 3), 100.0]
    )
    assert log.ts[-1] == 100.0
    linear = gflow.simulate(
        loss, data, 1.0, params0=params0, n_save=5, spacing="linear"
    )
    np.testing.assert_allclose(linear.ts, [0.0, 0.25, 0.5, 0.75, 1.0])


def test_diffrax_solver_instance_is_accepted():
    loss, data, params0, exact = quadratic_problem()
    traj = gflow.simulate(
        loss, data, 1.0, params0=params0, solver=diffrax.Dopri5(), rtol=1e-9
    )
    assert traj.meta["solver"] == "Dopri5"
    assert max_error(traj, exact) < 1e-7


def test_max_steps_reached():
    loss, data, params0, _ = quadratic_problem()
    with pytest.raises(gflow.SimulationError, match="max_steps=3") as info:
        gflow.simulate(loss, data, 10.0, params0=params0, max_steps=3)
    assert info.value.result == "max_steps_reached"
    traj = gflow.simulate(loss, data, 10.0, params0=params0, max_steps=3, throw=False)
    assert traj.result == "max_steps_reached" and not traj.succeeded
    assert np.all(np.isfinite(traj.ts)) and float(traj.ts[-1]) < 10.0
    assert np.all(np.isfinite(traj.loss))
    assert traj.stats["num_steps"] == 3


def test_finite_time_blow_up_is_reported():
    # L = −x⁴/4: dx/dt = x³ blows up at t = 1/(2 x0²) = 0.5.
    def loss(params, data):
        return -0.25 * jnp.sum(params**4)

    traj = gflow.simulate(
        loss,
        None,
        1.0,
        params0=jnp.ones(1),
        throw=False,
        max_steps=2000,
        spacing="linear",
        n_save=11,
    )
    assert traj.result in ("max_steps_reached", "diverged")
    assert float(traj.ts[-1]) <= 0.5 + 1e-6
    assert np.all(np.isfinite(traj.loss))

    gd = gflow.simulate(
        loss,
        None,
        1.0,
        params0=jnp.ones(1),
        solver="euler",
        dt0=0.01,
        throw=False,
        spacing="linear",
        n_save=11,
    )
    assert gd.result == "diverged"
    assert np.all(np.isfinite(gd.loss)) and float(gd.ts[-1]) < 1.0
    with pytest.raises(gflow.SimulationError, match="diverged"):
        gflow.simulate(loss, None, 1.0, params0=jnp.ones(1), solver="euler", dt0=0.01)


def test_progress_bar_runs(capsys):
    loss, data, params0, _ = quadratic_problem()
    traj = gflow.simulate(loss, data, 1.0, params0=params0, progress=True)
    assert traj.result == "successful"
    # tqdm (a test extra) draws the bar on stderr, and ends it full.
    assert "100.00%" in capsys.readouterr().err


_CACHED_RUN = """
import json, jax.numpy as jnp, gflow
def loss(params, data):
    return 0.5 * jnp.sum(data * params["x"] ** 2)
traj = gflow.simulate(loss, jnp.array([1.0, 3.0]), 2.0, params0={"x": jnp.ones(2)})
print(json.dumps({k: traj.stats[k] for k in
                  ("compiled", "compile_time_s", "compile_cache_hits")}))
"""


def test_a_rerun_in_a_new_process_loads_its_programs_from_the_cache(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, GFLOW_COMPILATION_CACHE="1", GFLOW_CACHE_DIR=str(tmp_path / "cache")
    )

    def run():
        done = subprocess.run(
            [sys.executable, "-c", _CACHED_RUN],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["compiled"]
    assert any((tmp_path / "cache").iterdir())
    # The second process compiles nothing: every program comes from the cache.
    assert not second["compiled"] and second["compile_cache_hits"] >= 1
    assert second["compile_time_s"] < first["compile_time_s"]
    # Switched off, nothing is cached.
    env.update(GFLOW_COMPILATION_CACHE="0", GFLOW_CACHE_DIR=str(tmp_path / "off"))
    assert run()["compiled"] and not (tmp_path / "off").exists()
