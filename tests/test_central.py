"""The central flow (gflow.flows.CentralFlow) and its linear algebra: closed forms,
the complementarity problem against CVXPY, ensembles, checkpoints, counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gflow
from gflow._linalg import (
    psd_qp,
    rows_applied,
    smat,
    svec,
    top_eigenpairs,
    upper_pairs,
)

LR = 0.1
C = -0.5  # the loss's slope along y: the flow sharpens at rate −C


def sharpening(params, data):
    """L(x, y) = ½ y x² + C y. At x = 0 the Hessian is diag(y, 0), its top
    eigenvector e_x whatever y, and −∇L = (0, −C): y (the sharpness) grows at
    rate −C until lr·y reaches 2, where gradient descent's x starts to oscillate
    and its ½ y x² pushes y back. The central flow holds y at the edge with
    σ² = ⟨x²⟩ = −2C (its constraint relaxed at rate 1/lr: see `closed_form`)."""
    return 0.5 * params["y"] * params["x"] ** 2 + C * params["y"]


def closed_form(t, y0):
    """The central flow of `sharpening` from (0, y0), y0 < 2/lr, with the edge
    kept by the relaxation dS/dt ≤ (2/lr − S)/lr: y rises as the gradient flow
    until the constraint binds, at y_on = 2/lr + C·lr, then approaches 2/lr as
    2/lr + C·lr·exp(−(t − t_on)/lr). Returns (y, σ², predicted loss)."""
    edge = 2 / LR
    y_on = edge + C * LR
    t_on = (y_on - y0) / -C
    y = np.where(t < t_on, y0 - C * t, edge + C * LR * np.exp(-(t - t_on) / LR))
    sigma2 = 2 * np.maximum(0.0, -C - (edge - y) / LR)
    return y, sigma2, C * y + 0.5 * sigma2 * y


def run(y0, t_max=20.0, dtype=jnp.float64, lr=LR, **keywords):
    p0 = {"x": jnp.zeros((), dtype), "y": jnp.asarray(y0, dtype)}
    options = dict(rtol=1e-10, atol=1e-12) if dtype == jnp.float64 else {}
    return gflow.simulate(
        sharpening,
        None,
        t_max,
        params0=p0,
        ts=np.linspace(0, t_max, 81),
        flow=gflow.flows.CentralFlow(lr, track=2),
        **{**options, **keywords},
    )


def test_closed_form_before_and_at_the_edge():
    traj = run(15.0)
    t = np.asarray(traj.ts)
    y, sigma2, predicted = closed_form(t, 15.0)
    np.testing.assert_allclose(traj.params["y"], y, rtol=1e-8)
    np.testing.assert_allclose(traj.params["x"], 0.0, atol=1e-9)
    np.testing.assert_allclose(traj.metrics["oscillation"], sigma2, atol=1e-6)
    np.testing.assert_allclose(traj.metrics["predicted_loss"], predicted, atol=1e-5)
    np.testing.assert_allclose(traj.metrics["sharpness"], y, rtol=1e-8)
    np.testing.assert_allclose(traj.metrics["effective_eigenvalues"][:, 0], LR * y)
    at_edge = sigma2 > 0
    np.testing.assert_array_equal(traj.metrics["edge_count"], at_edge.astype(int))
    # Settled: GD's oscillation has σ² = −2C and its predicted loss is 0 there.
    assert abs(traj.metrics["oscillation"][-1] - (-2 * C)) < 1e-9
    assert np.all(LR * np.asarray(traj.metrics["sharpness"]) <= 2 * (1 + 1e-9))


def test_before_the_edge_it_is_the_gradient_flow():
    traj = run(15.0, t_max=8.0)
    flow = gflow.simulate(
        sharpening, None, 8.0, params0={"x": 0.0, "y": 15.0}, ts=traj.ts,
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    assert np.all(np.asarray(traj.metrics["oscillation"]) == 0)
    assert np.all(np.asarray(traj.metrics["edge_count"]) == 0)
    np.testing.assert_allclose(traj.params["y"], flow.params["y"], rtol=1e-12)
    np.testing.assert_allclose(traj.loss, traj.metrics["predicted_loss"], rtol=0)
    # No eigenvalue near the edge: no third-order product was computed.
    assert traj.stats["num_third_order_evals"] == 0


def test_work_counts_are_exact_before_the_edge():
    traj = run(15.0, t_max=8.0)
    s, track, iters = traj.stats, 2, 3
    # Start: LOBPCG of 30 iterations; each evaluation: a Rayleigh-Ritz of the
    # pairs near the edge and the next one (none and one here); each attempt: a
    # refresh (LOBPCG of `iters`); each row: a Rayleigh-Ritz of every pair.
    expected = (
        track * 31
        + s["num_solver_grad_evals"]
        + track * (iters + 1) * s["num_steps"]
        + track * s["num_save_grad_evals"]
    )
    assert s["num_hvp_evals"] == expected


def test_float32():
    traj = run(19.0, t_max=10.0, dtype=jnp.float32)
    assert traj.params["y"].dtype == jnp.float32
    assert traj.succeeded
    assert np.all(LR * np.asarray(traj.metrics["sharpness"]) <= 2 * (1 + 1e-2))
    assert abs(float(traj.metrics["oscillation"][-1]) - (-2 * C)) < 1e-3


def test_observables_predict_time_averages():
    def second_moment(params, data):
        return params["x"] ** 2  # GD's ⟨x²⟩ = σ² at the edge

    flow = gflow.flows.CentralFlow(LR, track=2, observables={"x2": second_moment})
    traj = gflow.simulate(
        sharpening, None, 20.0, params0={"x": 0.0, "y": 19.0}, flow=flow,
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    np.testing.assert_allclose(traj.metrics["x2"], traj.metrics["oscillation"])


def test_ensemble_members_equal_simulate():
    y0 = jnp.array([15.0, 18.0, 19.99])
    p0 = {"x": jnp.zeros(3), "y": y0}
    kwargs = dict(
        ts=np.linspace(0, 20, 41), flow=gflow.flows.CentralFlow(LR, track=2),
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    ensemble = gflow.simulate_ensemble(sharpening, None, 20.0, params0=p0, **kwargs)
    for i in range(3):
        one = gflow.simulate(
            sharpening, None, 20.0, params0={"x": 0.0, "y": y0[i]}, **kwargs
        )
        member = ensemble.member(i)
        np.testing.assert_allclose(member.params["y"], one.params["y"], rtol=1e-12)
        np.testing.assert_allclose(
            member.metrics["oscillation"], one.metrics["oscillation"], atol=1e-10
        )
        for key in ("num_steps", "num_hvp_evals", "num_third_order_evals"):
            assert member.stats[key] == one.stats[key], key


def test_checkpoint_resume_is_bit_for_bit(tmp_path):
    whole = run(15.0)
    cut = run(15.0, checkpoint=tmp_path, checkpoint_steps=7)
    assert cut.stats["checkpoint_writes"] > 1
    for name in ("x", "y"):
        np.testing.assert_array_equal(whole.params[name], cut.params[name])
    np.testing.assert_array_equal(
        whole.metrics["oscillation"], cut.metrics["oscillation"]
    )
    for key in ("num_steps", "num_hvp_evals", "num_third_order_evals"):
        assert whole.stats[key] == cut.stats[key], key


def test_a_new_learning_rate_does_not_recompile():
    run(15.0, t_max=2.0)
    assert not run(15.0, t_max=2.0, lr=0.11).stats["compiled"]


def test_bad_input_is_refused():
    for lr in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            gflow.flows.CentralFlow(lr)
    with pytest.raises(ValueError, match="track"):
        gflow.flows.CentralFlow(0.1, track=0)
    with pytest.raises(TypeError, match="observables"):
        gflow.flows.CentralFlow(0.1, observables={"f": 1.0})

    # A custom gradient computed on the host: one derivative, not three.
    @jax.custom_vjp
    def square(x):
        return x**2

    def host_gradient(x, g):
        twice = jax.pure_callback(lambda x: 2 * np.asarray(x), x, x)
        return (twice * g,)

    square.defvjp(lambda x: (x**2, x), host_gradient)

    def loss(params, data):
        return jnp.sum(square(params))

    gflow.simulate(loss, None, 1.0, params0=jnp.ones(3))  # the gradient flow runs
    with pytest.raises(ValueError, match="three times.*pure_callback"):
        gflow.simulate(
            loss, None, 1.0, params0=jnp.ones(3), flow=gflow.flows.CentralFlow(0.1)
        )


@pytest.mark.slow  # a minute and more: the slow tier
def test_the_default_tracks_more_eigenvalues_as_they_reach_the_edge():
    # A network of 12 outputs, each a two-layer linear chain a_i b_i fitting y_i
    # > 1/lr: every minimum is sharper than the edge 2/lr, so each output's
    # eigenvalue rises to the edge and stays; 12 at the edge, more than the 4
    # the default starts with (or the 8 it once could track). The flow comes to
    # rest where each block is balanced (a_i = b_i) with its top Hessian
    # eigenvalue, 3a_i² − y_i, at the edge: a_i² = (2/lr + y_i)/3.
    y = jnp.linspace(1.1, 1.4, 12) / LR

    def loss(params, data):
        return 0.5 * jnp.sum((params["a"] * params["b"] - y) ** 2)

    params0 = {"a": jnp.linspace(0.1, 0.2, 12), "b": jnp.linspace(0.15, 0.05, 12)}
    central = gflow.simulate(
        loss, None, 80.0 * LR, params0=params0, n_save=41,
        flow=gflow.flows.CentralFlow(LR),
    )  # fmt: skip
    tracked, at_edge = central.metrics["tracked"], central.metrics["edge_count"]
    assert tracked[0] == 4 and tracked[-1] == 16 and np.all(np.diff(tracked) >= 0)
    assert at_edge[-1] == 12 and np.all(at_edge <= tracked)
    a, b = (np.asarray(central.params[k][-1]) for k in "ab")
    np.testing.assert_allclose(a, b, atol=1e-6)
    # (The edge is held to about 1e-5 by the relaxation of the constraint.)
    np.testing.assert_allclose(a**2, (2 / LR + y) / 3, rtol=1e-4)
    effective = central.metrics["effective_eigenvalues"][-1]
    np.testing.assert_allclose(effective[:12], 2.0, rtol=1e-4)
    assert np.all(effective[12:16] < 2 * 0.75) and np.all(np.isnan(effective[16:]))


def test_too_few_tracked_eigenvalues_are_refused():
    # Three equal curvatures at the edge, one tracked.
    def loss(params, data):
        return 0.5 * (2 / LR) * jnp.sum(params**2)

    with pytest.raises(ValueError, match="track=3"):
        gflow.simulate(
            loss, None, 0.5, params0=jnp.ones(3),
            flow=gflow.flows.CentralFlow(LR, track=1),
        )  # fmt: skip
    # Refused at the first step that shows it: from there the flow stands still
    # (it reaches t_max in a few steps), and the call raises at the end.
    flow = gflow.flows.CentralFlow(LR, track=1)
    state, carried, _ = flow.init(loss, jnp.ones(3), None)
    assert not carried.refused
    carried, _ = flow.update(loss, 0.0, state, carried, None)
    assert carried.refused
    velocity = flow.field(loss, carried)(0.0, state, None).params
    np.testing.assert_array_equal(velocity, 0.0)
    # With every parameter tracked, nothing is missing: not refused.
    full = gflow.flows.CentralFlow(LR, track=3)
    state, carried, _ = full.init(loss, jnp.ones(3), None)
    assert not full.update(loss, 0.0, state, carried, None)[0].refused
    # It suggests only what CentralFlow accepts: 32 at most (not 33), and past
    # that, says it cannot model the run. (Its check on a finished run, every
    # tracked eigenvalue at the edge, of 40 parameters.)
    for track, match in ((31, "track=32"), (32, "32 is the most CentralFlow tracks")):
        with pytest.raises(ValueError, match=match):
            gflow.flows.CentralFlow(LR, track=track).check(_at_edge(track, track))
    # The default adapts up to 16: 12 tracked, all at the edge, is not a
    # refusal (it tracks more in the next step); 16 is, naming a fixed track.
    gflow.flows.CentralFlow(LR).check(_at_edge(12, 16))
    with pytest.raises(ValueError, match=r"CentralFlow\(lr\): all 16 .* track=24\)"):
        gflow.flows.CentralFlow(LR).check(_at_edge(16, 16))


def _at_edge(tracked: int, slots: int) -> gflow.Trajectory:
    """A finished central flow of 40 parameters with `tracked` eigenvalues
    tracked (of `slots`), all at the edge."""
    effective = jnp.where(jnp.arange(slots) < tracked, 2.0, jnp.nan)
    return gflow.Trajectory(
        ts=jnp.asarray([0.0, 0.5]), params={"w": jnp.ones((2, 40))},
        velocity={"w": jnp.zeros((2, 40))}, loss=jnp.ones(2),
        grad_norm=jnp.ones(2), result="successful", stats={}, meta={},
        metrics={
            "effective_eigenvalues": jnp.tile(effective, (2, 1)),
            "tracked": jnp.full(2, tracked),
        },
        param_rows=np.arange(2),
    )  # fmt: skip


def test_midpoints_average_out_a_period_two_oscillation():
    ts = np.arange(6) * 0.5
    sign = (-1.0) ** np.arange(6)
    traj = gflow.Trajectory(
        ts=jnp.asarray(ts),
        params={"w": jnp.asarray(ts + 0.3 * sign)},
        velocity={"w": jnp.zeros(6)},
        loss=jnp.asarray(1 + 0.1 * sign),
        grad_norm=jnp.ones(6),
        metrics={},
        result="successful",
        stats={},
        meta={},
        param_rows=np.arange(6),
    )
    mid = traj.midpoints()
    np.testing.assert_allclose(mid.ts, ts[1:-1])
    np.testing.assert_allclose(mid.params["w"], ts[1:-1], atol=1e-15)
    np.testing.assert_allclose(mid.loss, 1.0)
    with pytest.raises(ValueError, match="every step"):
        traj[np.array([0, 1, 3, 4])].midpoints()


# The linear algebra.


def test_top_eigenpairs_match_numpy():
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(40, 40)))[0]
    values = np.concatenate([[10.0, 9.5, 7.0], rng.uniform(-1, 5, 37)])
    a = jnp.asarray(q @ np.diag(values) @ q.T)
    start = jnp.asarray(rng.normal(size=(3, 40)))
    found, vectors = top_eigenpairs(lambda x: x @ a, start, 25)
    np.testing.assert_allclose(found, values[:3], rtol=1e-10)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(vectors @ a, found[:, None] * vectors, atol=1e-8)
    # A start that is already converged (zero residuals) stays put, exactly.
    exact, _ = top_eigenpairs(
        lambda x: x @ jnp.diag(jnp.arange(6.0)), jnp.eye(6)[4:], 5
    )
    np.testing.assert_array_equal(exact, [5.0, 4.0])


def test_top_eigenpairs_of_the_first_rows_only():
    # With a count, the first `count` rows are iterated (in Ritz problems of
    # size 8 for 6, and 16 for 12): the top `count` pairs; the other rows come back
    # as given. `rows_applied` applies the map to the first `count` rows only.
    rng = np.random.default_rng(2)
    q = np.linalg.qr(rng.normal(size=(50, 50)))[0]
    values = np.concatenate([np.linspace(20.0, 9.0, 12), rng.uniform(-1, 5, 38)])
    a = jnp.asarray(q @ np.diag(values) @ q.T)
    start = jnp.asarray(rng.normal(size=(32, 50)))

    def apply_rows(rows):
        return rows_applied(lambda v: a @ v, rows, count)

    for count in (6, 12):
        found, vectors = jax.jit(
            lambda s, c: top_eigenpairs(apply_rows, s, 30, c)
        )(start, count)  # fmt: skip
        np.testing.assert_allclose(found[:count], values[:count], rtol=1e-9)
        assert np.all(found[count:] == 0)
        np.testing.assert_array_equal(vectors[count:], start[count:])
        tracked = vectors[:count]
        np.testing.assert_allclose(tracked @ tracked.T, np.eye(count), atol=1e-12)
    rows = jnp.asarray(rng.normal(size=(10, 50)))
    applied = rows_applied(lambda v: a @ v, rows, jnp.asarray(7))
    np.testing.assert_allclose(applied[:7], rows[:7] @ a, atol=1e-12)
    assert np.all(applied[7:] == 0)


def test_svec_is_an_isometry():
    rng = np.random.default_rng(1)
    x, y = (jnp.asarray((m + m.T) / 2) for m in rng.normal(size=(2, 4, 4)))
    assert np.isclose(svec(x) @ svec(y), jnp.sum(x * y))
    np.testing.assert_allclose(smat(svec(x)), x)
    i, j = upper_pairs(3)  # column by column: the 2 × 2 block first
    pairs = [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)]
    assert list(zip(i, j, strict=True)) == pairs


def test_psd_qp_one_variable_closed_form():
    for q, a in ((2.0, -1.0), (0.5, 3.0), (4.0, -8.0)):
        x = psd_qp(jnp.array([[q]]), jnp.array([a]))
        assert float(x[0]) == pytest.approx(max(0.0, -a / q), rel=1e-12)


def test_psd_qp_is_exactly_zero_when_a_is_psd():
    q = jnp.eye(3) + 0.1
    a = svec(jnp.array([[2.0, 0.5], [0.5, 1.0]]))
    assert np.all(np.asarray(psd_qp(q, a)) == 0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_psd_qp_matches_cvxpy(k):
    cp = pytest.importorskip("cvxpy")
    solve = jax.jit(psd_qp)  # one program for the ten problems, as in a flow
    rng = np.random.default_rng(k)
    n = k * (k + 1) // 2
    i, j = upper_pairs(k)
    for _ in range(10):
        scale = rng.uniform(0.5, 2.0, size=k)  # per eigenvector, as in a flow
        g = rng.normal(size=(n, 30)) * (scale[i] * scale[j])[:, None]
        q, a = g @ g.T / 2, rng.normal(size=n)
        x = cp.Variable((k, k), PSD=True)
        weight = np.where(i == j, 1.0, np.sqrt(2.0))
        vec = cp.hstack([x[p, r] * w for p, r, w in zip(i, j, weight, strict=True)])
        objective = a @ vec + 0.5 * cp.sum_squares(g.T @ vec) / 2
        best = cp.Problem(cp.Minimize(objective))
        best.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12)
        ours = np.asarray(solve(jnp.asarray(q), jnp.asarray(a)))
        value = a @ ours + ours @ q @ ours / 2
        assert value <= best.value + 1e-7 * abs(best.value)
        assert np.linalg.eigvalsh(np.asarray(smat(jnp.asarray(ours))))[0] >= -1e-12
        # The flow's term Gᵀx: an objective within 1e-7 of the optimum fixes it
        # to about sqrt(1e-7) of its size (the objective is ¼‖Gᵀx‖² + a·x).
        term, reference = g.T @ ours, g.T @ np.asarray(svec(jnp.asarray(x.value)))
        assert (
            np.linalg.norm(term - reference) <= 1e-3 * np.linalg.norm(reference) + 1e-9
        )


def test_central_flow_takes_gd_and_rmsprop_and_refuses_the_others_naming_rod_flows():
    gd = gflow.optimizers.GD(0.05)
    assert gflow.flows.CentralFlow(gd).optimizer is gd
    assert float(gflow.flows.CentralFlow(0.05).optimizer.lr) == 0.05
    opt = gflow.optimizers
    for other in (opt.Adam(1e-3), opt.HeavyBall(0.1, 0.9), opt.Nesterov(0.1, 0.9)):
        with pytest.raises(TypeError, match="GD and RMSProp.*RodFlow"):
            gflow.flows.CentralFlow(other)


# RMSProp's central flow. L(x, y) = ½ y x² + C y + ½ A y²: RMSProp (ε = 0) settles
# into a period-2 orbit in which both coordinates oscillate, x because y/P_x
# sits at the edge and y because its mean gradient vanishes, so that ν_y, and
# P_y with it, shrink until y's own curvature A/P_y reaches the edge too.
A_Y = 0.05
LR_RMS = 0.1


def settling(params, data):
    y = params["y"]
    return 0.5 * y * params["x"] ** 2 + C * y + 0.5 * A_Y * y**2


def rmsprop_run(scalar, t_max=200.0, dtype=jnp.float64, b2=0.9, lr=LR_RMS, **keywords):
    opt = gflow.optimizers.RMSProp(
        lr, b2=b2, eps=0.0, eps_in_sqrt=False, scalar=scalar, nu0=0.01
    )
    p0 = {"x": jnp.asarray(0.05, dtype), "y": jnp.asarray(5.0, dtype)}
    options = dict(rtol=1e-10, atol=1e-12) if dtype == jnp.float64 else {}
    flow = gflow.flows.CentralFlow(opt, track=2)
    ts = np.arange(round(t_max / LR_RMS) + 1) * LR_RMS
    traj = gflow.simulate(
        settling, None, t_max, params0=p0, ts=ts, flow=flow, **options, **keywords
    )
    return opt, p0, traj


def test_rmsprop_closed_form_with_two_eigenvalues_at_the_edge():
    # Per coordinate, at rest: lr y/√ν_x = 2 with ν_x = y² σ_x² gives σ_x² = lr²/4;
    # dy = 0 gives y = −(C + σ_x²/2)/A; lr A/√ν_y = 2 gives ν_y = (lr A/2)², of
    # which the mean gradient's square (C + A y)² leaves A² σ_y².
    opt, p0, traj = rmsprop_run(scalar=False)
    sx = LR_RMS**2 / 4
    y = -(C + sx / 2) / A_Y
    nu_y = (LR_RMS * A_Y / 2) ** 2
    sy = (nu_y - (C + A_Y * y) ** 2) / A_Y**2
    last = {k: float(v[-1]) for k, v in traj.state["nu"].items()}
    np.testing.assert_allclose(float(traj.params["y"][-1]), y, rtol=1e-9)
    np.testing.assert_allclose(float(traj.params["x"][-1]), 0.0, atol=1e-9)
    np.testing.assert_allclose(last["x"], y**2 * sx, rtol=1e-8)
    np.testing.assert_allclose(last["y"], nu_y, rtol=1e-8)
    np.testing.assert_allclose(
        float(traj.metrics["oscillation"][-1]), sx + sy, rtol=1e-7
    )
    np.testing.assert_allclose(
        traj.metrics["effective_eigenvalues"][-1], 2.0, rtol=1e-9
    )
    assert int(traj.metrics["edge_count"][-1]) == 2
    # RMSProp itself: its midpoints sit at y, and ⟨x²⟩ = σ_x² in its orbit.
    run = gflow.gradient_descent(
        settling, None, 200.0, optimizer=opt, params0=p0, ts=traj.ts
    )
    np.testing.assert_allclose(float(run.midpoints().params["y"][-2]), y, rtol=1e-6)
    np.testing.assert_allclose(
        np.mean(np.asarray(run.params["x"][-100:]) ** 2), sx, rtol=1e-4
    )


def test_scalar_rmsprop_closed_form_at_the_edge():
    # One ν for both, at rest: ν = (C + A y)² + y² σ² (the oscillation along x),
    # lr y/√ν = 2 and y = −(C + σ²/2)/A: one equation in σ², solved by bisection.
    def excess(s):
        y = -(C + s / 2) / A_Y
        return y - 2 * np.sqrt((C + A_Y * y) ** 2 + y**2 * s) / LR_RMS

    lo, hi = 1e-8, 0.5
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) * excess(lo) > 0 else (lo, mid)
    s = (lo + hi) / 2
    y = -(C + s / 2) / A_Y
    opt, p0, traj = rmsprop_run(scalar=True, t_max=300.0)
    np.testing.assert_allclose(float(traj.params["y"][-1]), y, rtol=1e-9)
    np.testing.assert_allclose(float(traj.metrics["oscillation"][-1]), s, rtol=1e-7)
    np.testing.assert_allclose(
        float(traj.state["nu"][-1]), (C + A_Y * y) ** 2 + y**2 * s, rtol=1e-8
    )
    assert int(traj.metrics["edge_count"][-1]) == 1


def test_rmsprop_below_the_edge_is_its_stable_flow_with_bias_correction_and_schedule():
    # Far below the edge (no third-order products), with a warm-up schedule and
    # bias correction: dθ/ds = −g lr(s)/P(s, ν), dν/ds = −ln b2 (g² − ν), P =
    # √(ν/(1 − b2^(s+1)) + ε), from ν0 after taking in g0² (the moment the
    # first step uses), against a hand-written diffrax solve; t = s·base_lr.
    import diffrax

    curvature = jnp.array([0.5, 2.0, 1.0])

    def quadratic(params, data):
        return 0.5 * jnp.sum(curvature * params**2) + 0.1 * jnp.sum(params**4)

    base, b2, eps, nu0 = 0.02, 0.9, 1e-3, 0.5
    schedule = optax.linear_schedule(0.01, base, 50)
    opt = gflow.optimizers.RMSProp(
        schedule, b2, eps, bias_correction=True, nu0=nu0, base_lr=base
    )
    x0, t_max = jnp.array([1.0, -0.5, 0.25]), 2.0
    traj = gflow.simulate(
        quadratic, None, t_max, params0=x0, ts=np.linspace(0, t_max, 11),
        flow=gflow.flows.CentralFlow(opt, track=2), rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    assert traj.stats["num_third_order_evals"] == 0

    def field(t, y, args):
        x, nu = y
        s = t / base
        g = jax.grad(quadratic)(x, None)
        p = jnp.sqrt(nu / -jnp.expm1((s + 1) * jnp.log(b2)) + eps)
        return (-schedule(s) * g / p / base, -jnp.log(b2) * (g**2 - nu) / base)

    g0 = jax.grad(quadratic)(x0, None)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Tsit5(), 0.0, t_max, 1e-3,
        (x0, b2 * nu0 + (1 - b2) * g0**2),
        saveat=diffrax.SaveAt(ts=jnp.linspace(0, t_max, 11)),
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12),
    )  # fmt: skip
    np.testing.assert_allclose(traj.params, solution.ys[0], rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(traj.state["nu"], solution.ys[1], rtol=1e-7)


def test_gd_with_a_warm_up_keeps_the_moving_edge():
    # lr(s) rises linearly: the edge 2/lr(s) falls, and the central flow holds
    # the sharpness y on it, with σ² from dy/ds = −lr(C + σ²/2) = d(2/lr)/ds.
    start, base, steps = 0.05, 0.1, 400
    schedule = optax.linear_schedule(start, base, steps)
    opt = gflow.optimizers.GD(schedule, base_lr=base)
    t_max = 30.0
    traj = gflow.simulate(
        sharpening, None, t_max, params0={"x": 0.0, "y": 2 / start - 1.0},
        ts=np.linspace(0, t_max, 61), flow=gflow.flows.CentralFlow(opt, track=2),
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    s = np.asarray(traj.ts) / base
    lr = np.asarray(schedule(s))
    held = (np.asarray(traj.metrics["edge_count"]) > 0) & (s < steps)
    held[np.argmax(held)] = False  # the row it reaches the edge at: the onset
    assert held.sum() > 20
    y = np.asarray(traj.params["y"])[held]
    np.testing.assert_allclose(lr[held] * y, 2.0, rtol=2e-3)
    slope = (base - start) / steps  # d lr/ds
    sigma2 = 2 * (2 * slope / lr[held] ** 3 - C)
    np.testing.assert_allclose(traj.metrics["oscillation"][held], sigma2, rtol=2e-2)
    after = s > steps + 20  # a constant lr: GD's σ² = −2C again
    np.testing.assert_allclose(traj.metrics["oscillation"][after], -2 * C, rtol=1e-3)


def test_rmsprop_work_counts_float32_and_no_recompile():
    opt, p0, traj = rmsprop_run(scalar=False, t_max=20.0)
    s, track, iters = traj.stats, 2, 3
    # Tsit5's six a step and the first stage; one more at the start for ν's
    # first rate (the first row's dθ/dt does not give it), and one to take g0² in.
    assert s["num_solver_grad_evals"] == 6 * s["num_steps"] + 3
    assert s["num_hvp_evals"] == (
        track * 31
        + track * (s["num_solver_grad_evals"] - 1)  # not at the g0² one
        + track * (iters + 1) * s["num_steps"]
        + track * s["num_save_grad_evals"]
    )
    assert s["num_third_order_evals"] > 0
    _, _, again = rmsprop_run(scalar=False, t_max=20.0, b2=0.95, lr=0.09)
    assert not again.stats["compiled"]
    _, _, single = rmsprop_run(scalar=False, dtype=jnp.float32)
    assert single.succeeded and single.params["y"].dtype == jnp.float32
    assert single.state["nu"]["x"].dtype == jnp.float32
    y = -(C + LR_RMS**2 / 8) / A_Y  # the closed form's rest
    assert abs(float(single.params["y"][-1]) - y) < 1e-3 * y


@pytest.mark.slow
def test_rmsprop_ensemble_members_equal_simulate_and_checkpoints_resume(tmp_path):
    opt = gflow.optimizers.RMSProp(LR_RMS, b2=0.9, eps=0.0, eps_in_sqrt=False, nu0=0.01)
    flow = gflow.flows.CentralFlow(opt, track=2)
    kwargs = dict(ts=np.linspace(0, 20, 21), flow=flow, rtol=1e-10, atol=1e-12)
    y0 = jnp.array([5.0, 8.0])
    p0 = {"x": jnp.full(2, 0.05), "y": y0}
    ensemble = gflow.simulate_ensemble(settling, None, 20.0, params0=p0, **kwargs)
    for i in range(2):
        one = gflow.simulate(
            settling, None, 20.0, params0={"x": 0.05, "y": y0[i]}, **kwargs
        )
        member = ensemble.member(i)
        np.testing.assert_allclose(member.params["y"], one.params["y"], rtol=1e-12)
        np.testing.assert_allclose(
            member.state["nu"]["x"], one.state["nu"]["x"], rtol=1e-12
        )
        for key in ("num_steps", "num_hvp_evals", "num_third_order_evals"):
            assert member.stats[key] == one.stats[key], key
    whole = gflow.simulate(
        settling, None, 20.0, params0={"x": 0.05, "y": 5.0}, **kwargs
    )
    cut = gflow.simulate(
        settling, None, 20.0, params0={"x": 0.05, "y": 5.0},
        checkpoint=tmp_path, checkpoint_steps=50, **kwargs,
    )  # fmt: skip
    assert cut.stats["checkpoint_writes"] > 1
    np.testing.assert_array_equal(whole.params["y"], cut.params["y"])
    np.testing.assert_array_equal(whole.state["nu"]["y"], cut.state["nu"]["y"])
