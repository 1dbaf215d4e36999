"""Flows that model optimisers, against closed forms: the modified flow of gradient
descent, the heavy-ball flow, SGD's stochastic modified equation, and minibatch
gradient descent."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate
import scipy.linalg

import gflow
from gflow import flows

A = np.diag([0.5, 2.0, 8.0])
THETA0 = np.array([1.0, -1.0, 0.5])
TIGHT = dict(rtol=1e-11, atol=1e-13)


def quadratic(params, data):
    return 0.5 * params @ jnp.asarray(A) @ params


def gd_on_quadratic(lr, steps):
    """Gradient descent on ½θᵀAθ, exactly: (I − lr A)^k θ0."""
    return np.linalg.matrix_power(np.eye(3) - lr * A, steps) @ THETA0


def slope(hs, errors):
    return np.polyfit(np.log(hs), np.log(errors), 1)[0]


# --- ModifiedGD ---------------------------------------------------------------------


def test_modified_flow_is_the_closed_form_on_a_quadratic():
    """−∇(L + (lr/4)‖∇L‖²) = −(A + (lr/2)A²)θ: θ(t) = expm(−t(A + (lr/2)A²)) θ0."""
    lr, t = 0.05, 3.0
    traj = gflow.simulate(
        quadratic,
        None,
        t,
        params0=jnp.asarray(THETA0),
        flow=flows.ModifiedGD(lr),
        **TIGHT,
    )
    exact = scipy.linalg.expm(-t * (A + lr / 2 * A @ A)) @ THETA0
    np.testing.assert_allclose(traj.final, exact, rtol=1e-9, atol=1e-12)
    assert traj.meta["flow"] == "ModifiedGD(lr=0.05)"


def test_modified_flow_is_second_order_in_the_learning_rate():
    """GD's distance to the plain flow shrinks like lr, to the modified flow like
    lr² (every step's error is O(lr³))."""
    t = 2.0
    lrs = np.array([0.04, 0.02, 0.01, 0.005])
    plain, modified = [], []
    for lr in lrs:
        gd = gd_on_quadratic(lr, round(t / lr))
        flow = scipy.linalg.expm(-t * A) @ THETA0
        traj = gflow.simulate(
            quadratic,
            None,
            t,
            params0=jnp.asarray(THETA0),
            flow=flows.ModifiedGD(float(lr)),
            **TIGHT,
        )
        plain.append(np.linalg.norm(gd - flow))
        modified.append(np.linalg.norm(gd - np.asarray(traj.final)))
    assert 0.9 < slope(lrs, plain) < 1.1
    assert 1.9 < slope(lrs, modified) < 2.1
    assert np.all(np.array(modified) < np.array(plain) / 5)


def test_modified_flow_counts_one_hvp_per_gradient():
    """Every evaluation of the field is a gradient and a Hessian-vector product;
    every saved row's velocity one more of each."""
    traj = gflow.simulate(
        quadratic,
        None,
        2.0,
        params0=jnp.asarray(THETA0),
        flow=flows.ModifiedGD(0.05),
        solver="tsit5",
    )
    stats = traj.stats
    assert stats["num_hvp_evals"] == (
        stats["num_solver_grad_evals"] + stats["num_save_grad_evals"]
    )
    # Tsit5 (FSAL): 6 per step and one for the first step size (its first
    # evaluation is the first saved row's).
    assert stats["num_solver_grad_evals"] == 6 * stats["num_steps"] + 1


def test_modified_flow_reuses_the_compiled_program_for_a_new_lr():
    kwargs = dict(params0=jnp.asarray(THETA0), n_save=5)
    gflow.simulate(quadratic, None, 1.0, flow=flows.ModifiedGD(0.1), **kwargs)
    again = gflow.simulate(quadratic, None, 1.0, flow=flows.ModifiedGD(0.2), **kwargs)
    assert not again.stats["compiled"]


# --- HeavyBall ----------------------------------------------------------------------


def heavy_ball_exact(lr, beta, t, start):
    """m θ'' + θ' = −Aθ as a linear system in (θ, u)."""
    m = (1 + beta) * lr / (2 * (1 - beta) ** 2)
    system = np.block([[np.zeros((3, 3)), np.eye(3)], [-A / m, -np.eye(3) / m]])
    u0 = -(1 - beta) / (1 + beta) * A @ THETA0 if start == "matched" else 0 * THETA0
    return (scipy.linalg.expm(t * system) @ np.concatenate([THETA0, u0]))[:3]


@pytest.mark.parametrize("start", ["matched", "rest"])
def test_heavy_ball_flow_is_the_closed_form_on_a_quadratic(start):
    lr, beta, t = 0.01, 0.9, 3.0
    flow = flows.HeavyBall(lr, beta, start=start)
    traj = gflow.simulate(
        quadratic, None, t, params0=jnp.asarray(THETA0), flow=flow, **TIGHT
    )
    np.testing.assert_allclose(
        traj.final, heavy_ball_exact(lr, beta, t, start), rtol=1e-8, atol=1e-11
    )
    np.testing.assert_allclose(flow.mass, 1.9 * lr / (2 * 0.01))
    # auto runs Tsit5 here (the field is not a gradient); the velocity is u.
    assert traj.meta["solver"] == "Tsit5"
    assert traj.velocity.shape == traj.params.shape
    assert traj.stats["num_grad_evals"] == (
        traj.stats["num_solver_grad_evals"] + traj.stats["num_save_grad_evals"]
    )


def test_heavy_ball_flow_predicts_momentum_iterates():
    """Against optax.sgd(lr, momentum=0.9) on the time axis t = k lr / (1 − β): the
    heavy-ball flow is much closer than the plain flow, and the matched start than
    the start at rest, and its distance shrinks with lr."""
    beta, t = 0.9, 5.0
    milder = np.diag([0.2, 0.5, 1.0])

    def loss(params, data):
        return 0.5 * params @ jnp.asarray(milder) @ params + 0.05 * jnp.sum(params**4)

    p0 = jnp.asarray([2.0, -1.5, 1.0])
    distances = {}
    for lr in (0.004, 0.002):
        gd = gflow.gradient_descent(
            loss,
            None,
            t,
            lr,
            params0=p0,
            optimizer=optax.sgd(lr, momentum=beta),
            time_per_step=lr / (1 - beta),
            n_save=20,
        )
        for name, flow in [
            ("plain", None),
            ("rest", flows.HeavyBall(lr, beta, "rest")),
            ("matched", flows.HeavyBall(lr, beta)),
        ]:
            traj = gflow.simulate(
                loss, None, t, params0=p0, ts=gd.ts, flow=flow, **TIGHT
            )
            distances[name, lr] = gflow.compare(traj, gd).max_param_distance
    for lr in (0.004, 0.002):
        assert distances["matched", lr] < distances["plain", lr] / 20
        assert distances["matched", lr] < distances["rest", lr] / 5
    assert distances["matched", 0.002] < 0.7 * distances["matched", 0.004]


def test_stabilized_solvers_refuse_a_flow_that_is_not_a_gradient():
    with pytest.raises(ValueError, match="rkc2.*gradient field.*HeavyBall"):
        gflow.simulate(
            quadratic,
            None,
            1.0,
            params0=jnp.asarray(THETA0),
            flow=flows.HeavyBall(0.01, 0.9),
            solver="rkc2",
        )


# --- SGD: the stochastic modified equation ------------------------------------------


def regression_data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = x @ np.array([1.0, -2.0]) + 0.5 + 0.8 * rng.normal(size=n)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def sme_moments(data, lr, batch, theta0, ts):
    """Mean and covariance of θ = (w, b) under the SME of linear regression, from
    their closed (linear) moment equations: the drift is linear,
    −(H + (lr/2)H²)(θ − θ*), and E[Σ(θ)] is quadratic in the moments."""
    x = np.asarray(data["x"])
    z = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # θ = (w, b)
    n, p = z.shape
    h = z.T @ z / n
    theta_star = np.linalg.lstsq(z, np.asarray(data["y"]), rcond=None)[0]
    e = z @ theta_star - np.asarray(data["y"])  # residuals at the optimum
    drift = h + lr / 2 * h @ h
    c = (n - batch) / (n - 1)

    def rhs(_, state):
        d, cov = state[:p], state[p:].reshape(p, p)
        r2 = (z @ d + e) ** 2 + np.einsum("ij,jk,ik->i", z, cov, z)
        sigma = (z.T * r2) @ z / n - h @ (cov + np.outer(d, d)) @ h
        dcov = -drift @ cov - cov @ drift.T + lr * c / batch * sigma
        return np.concatenate([-drift @ d, dcov.ravel()])

    start = np.concatenate([theta0 - theta_star, np.zeros(p * p)])
    sol = scipy.integrate.solve_ivp(
        rhs, (0, ts[-1]), start, t_eval=ts, rtol=1e-10, atol=1e-12
    )
    means = sol.y[:p].T + theta_star
    covs = sol.y[p:].T.reshape(-1, p, p)
    return means, covs


@pytest.mark.slow  # 2,048 paths: half a minute
def test_sde_paths_have_the_closed_form_mean_and_covariance():
    data = regression_data()
    lr, batch, paths, t = 0.1, 8, 2048, 3.0
    theta0 = np.array([2.0, 1.0, -1.0])
    model = gflow.models.LinearRegression(n_features=2)
    params0 = {
        "w": jnp.tile(jnp.asarray(theta0[:2]), (paths, 1)),
        "b": jnp.full(paths, theta0[2]),
    }
    keys = jax.random.split(jax.random.key(0), paths)
    ts = np.linspace(0, t, 7)
    sde = gflow.simulate_ensemble(
        model,
        data,
        t,
        params0=params0,
        ts=ts,
        flow=flows.SGD(lr, batch),
        noise_key=keys,
        dt0=lr / 8,
    )
    theta = np.concatenate(
        [np.asarray(sde.params["w"]), np.asarray(sde.params["b"])[..., None]], axis=-1
    )
    means, covs = sme_moments(data, lr, batch, theta0, ts)
    for k in range(1, len(ts)):
        sample_mean = theta[:, k].mean(0)
        sample_cov = np.cov(theta[:, k].T)
        standard_error = np.sqrt(np.diag(covs[k]) / paths)
        assert np.all(np.abs(sample_mean - means[k]) < 4 * standard_error)
        # Each variance to within its sampling error (~sqrt(2/paths) = 3%) and the
        # Euler–Maruyama bias; the covariances, relative to the variances.
        np.testing.assert_allclose(np.diag(sample_cov), np.diag(covs[k]), rtol=0.12)
        scale = np.sqrt(np.outer(np.diag(covs[k]), np.diag(covs[k])))
        assert np.all(np.abs(sample_cov - covs[k]) < 0.12 * scale)
    # Cost: 2 gradients (the drift's and the noise's vector-Jacobian product) and
    # one HVP per Euler step, plus a gradient and an HVP per saved row.
    stats = sde.stats
    np.testing.assert_array_equal(
        stats["num_solver_grad_evals"], 2 * stats["num_steps"]
    )
    np.testing.assert_array_equal(
        stats["num_hvp_evals"], stats["num_steps"] + stats["num_save_grad_evals"]
    )
    assert sde.meta["solver"] == "Euler" and sde.meta["dt0"] == lr / 8


def test_ensemble_member_equals_simulate_with_its_key():
    data = regression_data(n=16)
    model = gflow.models.LinearRegression(n_features=2)
    keys = jax.random.split(jax.random.key(3), 3)
    params0 = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(3)}
    flow = flows.SGD(0.1, 4)
    ens = gflow.simulate_ensemble(
        model, data, 1.0, params0=params0, flow=flow, noise_key=keys, n_save=5
    )
    one = gflow.simulate(
        model,
        data,
        1.0,
        params0={"w": jnp.zeros(2), "b": 0.0},
        flow=flow,
        noise_key=keys[1],
        n_save=5,
    )
    np.testing.assert_allclose(ens.member(1).params["w"], one.params["w"], rtol=1e-12)
    assert not np.allclose(ens.params["w"][0], ens.params["w"][1])


def test_full_batches_have_no_noise():
    """B = n: c = 0, every path is the modified flow's Euler solution."""
    data = regression_data(n=16)
    model = gflow.models.LinearRegression(n_features=2)
    params0 = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    ens = gflow.simulate_ensemble(
        model,
        data,
        1.0,
        params0=params0,
        flow=flows.SGD(0.1, 16),
        dt0=0.01,
        noise_key=jax.random.split(jax.random.key(0), 2),
    )
    euler = gflow.simulate(
        model,
        data,
        1.0,
        params0={"w": jnp.zeros(2), "b": 0.0},
        flow=flows.ModifiedGD(0.1),
        solver="euler",
        dt0=0.01,
    )
    np.testing.assert_allclose(ens.params["w"][0], ens.params["w"][1], rtol=0)
    np.testing.assert_allclose(ens.final["w"][0], euler.final["w"], rtol=1e-12)


# --- Minibatch gradient descent -----------------------------------------------------


def test_minibatches_are_drawn_without_replacement():
    """With L = mean over the batch of −θ·e_i, one step adds lr/B to each of B
    distinct coordinates."""
    n, batch, lr = 12, 5, 0.1

    def loss(params, data):
        return -jnp.mean(data @ params)

    for seed in range(5):
        gd = gflow.gradient_descent(
            loss,
            jnp.eye(n),
            lr,
            lr,
            params0=jnp.zeros(n),
            batch_size=batch,
            batch_key=seed,
        )
        step = np.asarray(gd.final)
        assert np.count_nonzero(step) == batch
        np.testing.assert_allclose(step[step != 0], lr / batch)


def test_full_batch_minibatches_are_gradient_descent():
    data = regression_data(n=16)
    model = gflow.models.LinearRegression(n_features=2)
    kwargs = dict(params0={"w": jnp.zeros(2), "b": 0.0}, n_save=5)
    full = gflow.gradient_descent(model, data, 1.0, 0.05, **kwargs)
    batched = gflow.gradient_descent(
        model, data, 1.0, 0.05, batch_size=16, batch_key=0, **kwargs
    )
    np.testing.assert_allclose(batched.final["w"], full.final["w"], rtol=1e-12)
    assert batched.meta["batch_size"] == 16
    # The rows agree, whether they reuse the step's gradient (full batch) or
    # evaluate their own on all the data (minibatches).
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(getattr(batched, name), getattr(full, name))
    np.testing.assert_allclose(batched.velocity["w"], full.velocity["w"], rtol=1e-12)
    steps = full.stats["num_steps"]
    assert full.stats["num_grad_evals"] == steps + 1
    assert batched.stats["num_grad_evals"] == steps + len(batched)


# --- Bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: flows.ModifiedGD(0.0), "`lr`"),
        (lambda: flows.ModifiedGD(-1.0), "`lr`"),
        (lambda: flows.HeavyBall(float("nan"), 0.5), "`lr`"),
        (lambda: flows.HeavyBall(0.1, 1.0), "`momentum`"),
        (lambda: flows.HeavyBall(0.1, -0.1), "`momentum`"),
        (lambda: flows.HeavyBall(0.1, 0.5, start="moving"), "`start`"),
        (lambda: flows.SGD(0.1, 0), "`batch_size`"),
        (lambda: flows.SGD(-0.1, 4), "`lr`"),
    ],
)
def test_bad_flow_settings_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_sgd_runs_are_named():
    data = regression_data(n=16)
    model = gflow.models.LinearRegression(n_features=2)
    p0 = {"w": jnp.zeros(2), "b": 0.0}
    with pytest.raises(ValueError, match="`batch_size` = 17 is larger"):
        gflow.simulate(
            model, data, 1.0, params0=p0, flow=flows.SGD(0.1, 17), noise_key=0
        )
    with pytest.raises(ValueError, match="`noise_key=`"):
        gflow.simulate(model, data, 1.0, params0=p0, flow=flows.SGD(0.1, 4))
    with pytest.raises(ValueError, match="per_example_loss"):
        gflow.simulate(
            model.loss, data, 1.0, params0=p0, flow=flows.SGD(0.1, 4), noise_key=0
        )
    with pytest.raises(ValueError, match="`noise_key` is for flows with noise"):
        gflow.simulate(model, data, 1.0, params0=p0, noise_key=0)
    with pytest.raises(ValueError, match="`solver` must be 'euler'"):
        gflow.simulate(
            model,
            data,
            1.0,
            params0=p0,
            flow=flows.SGD(0.1, 4),
            noise_key=0,
            solver="tsit5",
        )
    with pytest.raises(ValueError, match="3 keys, one per member"):
        gflow.simulate_ensemble(
            model,
            data,
            1.0,
            params0={"w": jnp.zeros((3, 2)), "b": jnp.zeros(3)},
            flow=flows.SGD(0.1, 4),
            noise_key=jax.random.key(0),
        )
    # With per_example_loss given, a plain loss function works.
    traj = gflow.simulate(
        model.loss,
        data,
        0.2,
        params0=p0,
        flow=flows.SGD(0.1, 4, per_example_loss=model.per_example_loss),
        noise_key=0,
    )
    assert traj.result == "successful"


def test_bad_minibatch_runs_are_named():
    data = regression_data(n=16)
    model = gflow.models.LinearRegression(n_features=2)
    p0 = {"w": jnp.zeros(2), "b": 0.0}
    for size, match in [(0, "integer >= 1"), (17, "larger than the data's 16")]:
        with pytest.raises(ValueError, match=match):
            gflow.gradient_descent(
                model, data, 1.0, 0.1, params0=p0, batch_size=size, batch_key=0
            )
    with pytest.raises(ValueError, match="`batch_key=`"):
        gflow.gradient_descent(model, data, 1.0, 0.1, params0=p0, batch_size=4)
    with pytest.raises(ValueError, match="same leading size"):
        gflow.gradient_descent(
            model,
            {"x": data["x"], "y": data["y"][:8]},
            1.0,
            0.1,
            params0=p0,
            batch_size=4,
            batch_key=0,
        )


def test_heavy_ball_ensemble_members_equal_simulate():
    """The (θ, θ') state goes through the ensemble's lanes like a parameter pytree."""
    p0 = jnp.asarray([THETA0, -0.5 * THETA0])
    flow = flows.HeavyBall(0.01, 0.9)
    ens = gflow.simulate_ensemble(quadratic, None, 2.0, params0=p0, flow=flow, n_save=5)
    one = gflow.simulate(quadratic, None, 2.0, params0=p0[1], flow=flow, n_save=5)
    np.testing.assert_allclose(ens.member(1).params, one.params, rtol=1e-12)
    np.testing.assert_allclose(ens.member(1).velocity, one.velocity, rtol=1e-12)


def test_a_checkpointed_sde_run_is_the_same_path(tmp_path):
    data = regression_data(n=16)
    model = gflow.models.LinearRegression(n_features=2)
    kwargs = dict(
        params0={"w": jnp.zeros(2), "b": 0.0}, flow=flows.SGD(0.1, 4), noise_key=3
    )
    cut = gflow.simulate(
        model, data, 2.0, checkpoint=tmp_path, checkpoint_steps=20, **kwargs
    )
    whole = gflow.simulate(model, data, 2.0, **kwargs)
    np.testing.assert_array_equal(cut.params["w"], whole.params["w"])
