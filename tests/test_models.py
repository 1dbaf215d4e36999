"""The built-in models: closed forms, invariants and the papers' results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from helpers import markov_reduced_loss

import gflow
from gflow.models import (
    COMMON,
    TARGET_1,
    TARGET_2,
    CondensationTransformer,
    CooccurrenceTransformer,
    DeepLinearNetwork,
    LinearRegression,
    MarkovCanonical,
    MarkovTransformer,
    anchor_data,
    cooccurrence_data,
    markov_data,
    markov_energy,
    markov_reference_losses,
)

P, Q = 0.5, 0.8


def energy_metric(params, data):
    return markov_energy(params["e"], params["w"])


# --- Linear models -------------------------------------------------------------------


def test_linear_regression_matches_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    data = {"x": jnp.asarray(x), "y": jnp.asarray(x @ [1.0, -2.0, 0.5] + 0.3)}
    model = LinearRegression(n_features=3)
    ts = np.array([0.0, 0.5, 2.0, 5.0])
    traj = gflow.simulate(model, data, 5.0, key=0, ts=ts, rtol=1e-10, atol=1e-12)
    # θ = (w, b): the loss is ½θᵀHθ − gᵀθ + c with H = [x 1]ᵀ[x 1] / n.
    design = np.hstack([x, np.ones((40, 1))])
    hessian = design.T @ design / 40
    optimum = np.linalg.lstsq(design, np.asarray(data["y"]), rcond=None)[0]
    for i, t in enumerate(ts):
        theta = optimum + scipy.linalg.expm(-t * hessian) @ (0 - optimum)
        np.testing.assert_allclose(traj.params["w"][i], theta[:3], atol=1e-9)
        np.testing.assert_allclose(traj.params["b"][i], theta[3], atol=1e-9)


def test_deep_linear_network_conserves_imbalance_and_fits():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4))
    target = rng.normal(size=(3, 4))
    data = {"x": jnp.asarray(x), "y": jnp.asarray(x @ target.T)}
    model = DeepLinearNetwork((4, 6, 5, 3), init_scale=0.3)
    traj = gflow.simulate(
        model,
        data,
        200.0,
        key=2,
        rtol=1e-10,
        atol=1e-12,
        metrics={"imbalance": lambda p, d: model.imbalances(p)},
    )
    for imbalance in traj.metrics["imbalance"]:
        assert float(jnp.max(jnp.abs(imbalance - imbalance[0]))) < 1e-8
    np.testing.assert_allclose(model.product(traj.final), target, atol=1e-5)


# --- Makkuva et al.: canonical (e, w) model ------------------------------------------


def test_markov_reference_losses():
    unigram, entropy_rate = markov_reference_losses(P, Q)
    assert round(unigram, 5) == 0.66628 and round(entropy_rate, 5) == 0.61901


@pytest.mark.parametrize(
    "e0, w0, basin",
    [(0.1, 0.1, "local"), (0.1, -1.0, "global"), (1.5, -0.3, "global")],
)
def test_markov_canonical_flow(e0, w0, basin):
    model = MarkovCanonical(P, Q)
    traj = gflow.simulate(
        model,
        None,
        2000.0,
        rtol=1e-10,
        atol=1e-12,
        params0={"e": jnp.array(e0), "w": jnp.array(w0)},
        metrics={"energy": energy_metric},
    )
    unigram, entropy_rate = markov_reference_losses(P, Q)
    target = unigram if basin == "local" else entropy_rate
    assert abs(float(traj.loss[-1]) - target) < 1e-5
    energy = np.asarray(traj.metrics["energy"])
    assert np.max(np.abs(energy - energy[0])) < 1e-8
    e, w = float(traj.final["e"]), float(traj.final["w"])
    if basin == "global":
        curve = np.log((1 - P) * (1 - Q) / (P * Q))
        assert abs((1 + 2 * w * abs(w)) * e**2 - curve) < 1e-4
    else:
        assert abs(e) < 1e-4


def test_markov_canonical_loss_and_optimal_bias():
    model = MarkovCanonical(P, Q)
    reference = markov_reduced_loss(P, Q)  # the formula of papers.md, written out
    with_bias = MarkovCanonical(P, Q, train_bias=True)
    for e, w in [(0.3, -0.7), (1.2, 0.4), (0.0, 0.5), (2.0, -1.5)]:
        params = {"e": jnp.array(e), "w": jnp.array(w)}
        assert abs(float(model.loss(params) - reference(params, None))) < 1e-12
        b_star = model.optimal_bias(params["e"], params["w"])
        # b* minimises L(e, w, b) over b: zero derivative, and the same loss.
        full = {**params, "b": b_star}
        assert abs(float(jax.grad(with_bias.loss)(full)["b"])) < 1e-12
        assert abs(float(with_bias.loss(full) - model.loss(params))) < 1e-12
    # At e = 0 the model is the unigram predictor.
    unigram, _ = markov_reference_losses(P, Q)
    zero = {"e": jnp.array(0.0), "w": jnp.array(0.3)}
    assert abs(float(model.loss(zero)) - unigram) < 1e-12
    # p < q and p > q take different (stable) branches of b*.
    flipped = MarkovCanonical(0.7, 0.2)
    assert np.isfinite(float(flipped.loss({"e": jnp.array(3.0), "w": jnp.array(2.0)})))


def test_markov_canonical_with_trained_bias():
    model = MarkovCanonical(P, Q, train_bias=True)
    params0 = {"e": jnp.array(1.5), "w": jnp.array(-0.3), "b": jnp.array(0.0)}
    traj = gflow.simulate(model, None, 3000.0, params0=params0, rtol=1e-10, atol=1e-12)
    _, entropy_rate = markov_reference_losses(P, Q)
    assert abs(float(traj.loss[-1]) - entropy_rate) < 1e-5


def test_markov_data_statistics():
    seqs = np.asarray(markov_data(jax.random.key(0), P, Q, n_seqs=4000, seq_len=50))
    assert seqs.shape == (4000, 50) and set(np.unique(seqs)) <= {0, 1}
    prev, nxt = seqs[:, :-1].ravel(), seqs[:, 1:].ravel()
    assert abs(np.mean(nxt[prev == 0]) - P) < 0.01  # P(0 -> 1) = p
    assert abs(np.mean(1 - nxt[prev == 1]) - Q) < 0.01  # P(1 -> 0) = q
    assert abs(np.mean(seqs[:, 0]) - P / (P + Q)) < 0.02  # stationary start


# --- Makkuva et al.: the full transformer (their Fig. 4 with the true flow) ----------


@pytest.mark.slow
def test_markov_transformer_gaussian_local_and_proposed_global():
    seq_len = 16
    train = markov_data(jax.random.key(0), P, Q, n_seqs=256, seq_len=seq_len)
    held_out = markov_data(jax.random.key(1), P, Q, n_seqs=2000, seq_len=seq_len)
    unigram, entropy_rate = markov_reference_losses(P, Q)
    for init, target in (("gaussian", unigram), ("makkuva", entropy_rate)):
        model = MarkovTransformer(d=8, seq_len=seq_len, init=init)
        traj = gflow.simulate(model, train, 600.0, key=2)
        assert abs(float(model.loss(traj.final, held_out)) - target) < 0.01, init


def test_markov_transformer_shapes_and_causality():
    model = MarkovTransformer(d=4, seq_len=6)
    params = model.init(jax.random.key(0))
    tokens = jnp.array([1, 0, 1, 1, 0, 0])
    logits = model.logits(params, tokens)
    # Changing the last token must not change earlier logits (causal attention).
    changed = model.logits(params, tokens.at[-1].set(1))
    np.testing.assert_allclose(logits[:-1], changed[:-1], rtol=1e-12)
    assert not np.allclose(logits[-1], changed[-1])
    with pytest.raises(ValueError, match=r"shape \(n_seqs, seq_len=6\)"):
        model.loss(params, jnp.zeros((3, 5), jnp.int32))


# --- Yang et al.: word co-occurrence at their Appendix A scale -----------------------


def test_cooccurrence_data_definition():
    data = cooccurrence_data(jax.random.key(0), n=60, L=5, d=64)
    tokens, y, group = (np.asarray(data[k]) for k in ("tokens", "y", "group"))
    assert np.bincount(group).tolist() == [30, 10, 10, 10]
    for row, label, g in zip(tokens, y, group, strict=True):
        assert np.sum(row == COMMON) == 1
        has1, has2 = np.sum(row == TARGET_1), np.sum(row == TARGET_2)
        assert (has1, has2) == {0: (1, 1), 1: (1, 0), 2: (0, 1), 3: (0, 0)}[g]
        assert label == (1.0 if g == 0 else -1.0)
        assert np.all(row[(row != TARGET_1) & (row != TARGET_2) & (row != COMMON)] >= 3)
    distinct = cooccurrence_data(jax.random.key(1), n=12, L=4, d=64, fillers="distinct")
    t = np.asarray(distinct["tokens"])
    fillers = t[t >= 3]
    assert len(np.unique(fillers)) == len(fillers)


def test_cooccurrence_model_matches_equation_one():
    """F(X) against a literal transcription of their eq. (1) with one-hot X."""
    model = CooccurrenceTransformer(d=8, L=4, m=5, m1=6)
    params = model.init(jax.random.key(3))
    data = cooccurrence_data(jax.random.key(4), n=6, L=4, d=8)
    a = np.array(model.readout, dtype=float)
    wq, wk, wv, w = (np.asarray(params[k]) for k in ("W_Q", "W_K", "W_V", "W"))
    outputs = model.output(params, data)
    for tokens, f in zip(np.asarray(data["tokens"]), outputs, strict=True):
        x = np.eye(8)[:, tokens]  # d × L, columns are words
        total = 0.0
        for l in range(4):
            s = x.T @ wk.T @ wq @ x[:, l] / np.sqrt(5)
            softmax = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            total += a @ w @ wv @ x @ softmax
        assert abs(total - float(f)) < 1e-10


def test_cooccurrence_helpers():
    model = CooccurrenceTransformer(d=8, L=4, m=5, m1=6)
    params = model.init(jax.random.key(5))
    kq = np.asarray(params["W_K"]).T @ np.asarray(params["W_Q"])
    vv = np.asarray(params["W_V"]).T @ np.asarray(params["W_V"])
    for i, j in [(TARGET_2, TARGET_1), (COMMON, TARGET_2), (5, 5)]:
        assert abs(float(model.attention_score(params, i, j)) - kq[i, j]) < 1e-12
        assert abs(float(model.value_overlap(params, i, j)) - vv[i, j]) < 1e-12
    np.testing.assert_allclose(model.key_query(params), kq, atol=1e-12)
    a = np.array(model.readout, dtype=float)
    g = a @ np.asarray(params["W"]) @ np.asarray(params["W_V"])
    np.testing.assert_allclose(model.mlp_value(params, jnp.arange(8)), g, atol=1e-12)
    data = cooccurrence_data(jax.random.key(6), n=12, L=4, d=8)
    weights = model.gradient_weights(params, data)
    margins = model.margins(params, data)
    np.testing.assert_allclose(weights, 1 / (1 + np.exp(np.asarray(margins))))
    # g_i = −ℓ'(y_i F_i): the derivative of each sample's loss in its margin.
    dloss = jax.grad(lambda m: jnp.sum(jax.nn.softplus(-m)))(margins)
    np.testing.assert_allclose(weights, -dloss, atol=1e-12)


def test_cooccurrence_two_phases_at_paper_scale():
    model = CooccurrenceTransformer(d=64, L=5, m=128, m1=256)
    data = cooccurrence_data(jax.random.key(0), n=60, L=5, d=64)
    metrics = {
        "margin_min": lambda p, d: jnp.min(model.margins(p, d)),
        "G": lambda p, d: model.mlp_value(p, jnp.array([TARGET_1, TARGET_2, COMMON])),
        "kq": lambda p, d: model.key_query(p),
    }
    traj = gflow.simulate(model, data, 300.0, key=1, metrics=metrics, n_save=201)
    g = np.asarray(traj.metrics["G"])
    aligned = (np.asarray(traj.metrics["margin_min"]) > 0) & (g[:, 0] > 0)
    aligned &= (g[:, 1] > 0) & (g[:, 2] < 0)
    assert aligned.any() and aligned[aligned.argmax() :].all()
    t1 = int(aligned.argmax())  # end of Phase 1: every sample right, G signs right
    kq = np.asarray(traj.metrics["kq"])
    drift = np.linalg.norm(kq - kq[0], axis=(1, 2)) / np.linalg.norm(kq[0])
    assert drift[t1] < 0.01  # attention still at its initial value
    assert float(traj.ts[t1]) < 1.0  # Phase 1 is short (Õ(1/m))
    assert float(traj.loss[-1]) < 1e-3
    # Phase 2: µ2ᵀW_KᵀW_Qµ1 rises and µ3ᵀW_KᵀW_Qµ1 falls, steadily.
    score_21 = kq[t1:, TARGET_2, TARGET_1]
    score_31 = kq[t1:, COMMON, TARGET_1]
    assert np.all(np.diff(score_21) > 0) and np.all(np.diff(score_31) < 0)


# --- Chen & Luo: condensation, then key–query rank collapse --------------------------


def row_condensation(w):
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = np.abs(unit @ unit.T)
    n = w.shape[0]
    return (cos.sum() - n) / (n * (n - 1))


def effective_rank(w):
    s = np.linalg.svd(w, compute_uv=False)
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def test_condensation_then_rank_collapse():
    eps = 1e-3
    model = CondensationTransformer(d_m=8, s=10, eps=eps)
    data = anchor_data(jax.random.key(0), n=64, d_m=8)
    ts = np.concatenate([[0.0], np.geomspace(1.0, 12000.0, 300)])
    metrics = {"balances": model.stage1_balances}
    traj = gflow.simulate(model, data, 12000.0, ts=ts, key=1, metrics=metrics)
    params = jax.tree.map(np.asarray, traj.params)
    cond_v = np.array([row_condensation(w) for w in params["W_V"]])
    cond_1 = np.array([row_condensation(w) for w in params["W1"]])
    q_drift = np.array(
        [np.linalg.norm(w - params["W_Q"][0]) for w in params["W_Q"]]
    ) / np.linalg.norm(params["W_Q"][0])
    k_drift = np.array(
        [np.linalg.norm(w - params["W_K"][0]) for w in params["W_K"]]
    ) / np.linalg.norm(params["W_K"][0])
    # Stage 1: the rows of W_V and W1 condense while W_Q and W_K have not moved.
    assert cond_v[0] < 0.5 and cond_1[0] < 0.5
    stage1 = (cond_v > 0.9) & (cond_1 > 0.9) & (q_drift < 0.01) & (k_drift < 0.01)
    assert stage1.any()
    end1 = int(stage1.argmax())
    # Its conservation laws hold up to there (their scale is ε²).
    for balance in traj.metrics["balances"]:
        drift = np.abs(np.asarray(balance[: end1 + 1]) - np.asarray(balance[0]))
        assert drift.max() < 1e-2 * eps**2
    # Stage 2: W_Q then grows and W_Q / ‖W_Q‖_F collapses towards rank one.
    ranks = np.array([effective_rank(w) for w in params["W_Q"]])
    assert ranks[0] > 6.0
    assert ranks[end1:].min() < 1.6
    assert q_drift[ranks.argmin()] > 10


def test_condensation_stage2_matrix_is_the_linearised_gradient():
    """For small W_Q, W_K and outer weights, −∂L/∂W_Q ≈ F W_K (papers.md)."""
    model = CondensationTransformer(d_m=6, s=5, eps=1e-4)
    data = anchor_data(jax.random.key(2), n=32, d_m=6, s=5)
    params = model.init(jax.random.key(3))
    grad = jax.grad(model.loss)(params, data)
    f = model.stage2_matrix(params, data)
    np.testing.assert_allclose(-grad["W_Q"], f @ params["W_K"], rtol=1e-3)
    np.testing.assert_allclose(-grad["W_K"], f.T @ params["W_Q"], rtol=1e-3)


# --- Bad configurations --------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MarkovCanonical(0.0, 0.5), "`p` must be a probability"),
        (lambda: MarkovCanonical(0.5, 1.2), "`q` must be a probability"),
        (lambda: markov_data(jax.random.key(0), 0.5, 1.0, n_seqs=4, seq_len=8), "`q`"),
        (
            lambda: markov_data(jax.random.key(0), 0.5, 0.5, n_seqs=4, seq_len=1),
            "`seq_len`",
        ),
        (lambda: MarkovTransformer(d=0), "`d` must be an integer >= 1"),
        (lambda: MarkovTransformer(init="xavier"), "`init` must be 'gaussian'"),
        (
            lambda: CooccurrenceTransformer(d=64, L=2, m=8, m1=8),
            "`L` must be an integer >= 3",
        ),
        (
            lambda: CooccurrenceTransformer(d=3, L=5, m=8, m1=8),
            "`d` must be an integer >= 4",
        ),
        (
            lambda: CooccurrenceTransformer(d=64, L=5, m=8, m1=0),
            "`m1` must be an integer >= 1",
        ),
        (
            lambda: CooccurrenceTransformer(d=64, L=5, m=8, m1=8, init="he"),
            "`init` must be",
        ),
        (
            lambda: CooccurrenceTransformer(d=64, L=5, m=8, m1=8, sigma0=-1.0),
            "`sigma0`",
        ),
        (
            lambda: cooccurrence_data(
                jax.random.key(0), n=60, L=5, d=64, fillers="distinct"
            ),
            "needs at most d − 3 = 61 filler slots",
        ),
        (
            lambda: cooccurrence_data(jax.random.key(0), n=6, L=5, d=64, fillers="x"),
            "fillers",
        ),
        (lambda: CondensationTransformer(d_m=4, eps=0.0), "`eps` must be a positive"),
        (lambda: CondensationTransformer(d_m=4, s=1), "`s` must be an integer >= 2"),
        (lambda: DeepLinearNetwork((4,)), "`dims` must be a tuple of at least two"),
        (lambda: DeepLinearNetwork((4, 0, 2)), r"`dims\[1\]`"),
        (lambda: LinearRegression(n_features=0), "`n_features`"),
    ],
)
def test_bad_configuration(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_canonical_rejects_data():
    model = MarkovCanonical(P, Q)
    with pytest.raises(ValueError, match="pass data=None"):
        gflow.simulate(model, jnp.ones(3), 1.0, params0={"e": 0.1, "w": 0.2})


@pytest.mark.parametrize(
    "make",
    [
        lambda: CooccurrenceTransformer(64, 5, 128, 256),
        lambda: cooccurrence_data(jax.random.key(0), 60, 5, 64),
        lambda: MarkovTransformer(8, 16),
        lambda: markov_data(jax.random.key(0), 0.5, 0.8, 256, 16),
        lambda: CondensationTransformer(8),
        lambda: anchor_data(jax.random.key(0), 64, 8),
        lambda: LinearRegression(3),
    ],
)
def test_sizes_are_keyword_only(make):
    # A model and its data generator take their sizes by name, so that
    # cooccurrence_data(key, n, L, d) and CooccurrenceTransformer(d, L, m, m1)
    # cannot be mixed up.
    with pytest.raises(TypeError, match="positional argument"):
        make()
