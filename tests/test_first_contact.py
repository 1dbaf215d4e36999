"""What a new user meets first: phases of their own model, failures that explain
themselves, and the recipes of the README."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow
from gflow.models import CooccurrenceTransformer, cooccurrence_data


class Attention(eqx.Module):
    W_Q: jax.Array
    W_K: jax.Array
    W_V: jax.Array


class EquinoxCooccurrence(eqx.Module):
    """Yang et al.'s transformer written as a user would: an Equinox module with an
    attention block and an MLP, its readout a fixed field."""

    attn: Attention
    mlp: jax.Array
    readout: jax.Array  # integers: held fixed

    def output(self, data):
        attn = self.attn

        def one(tokens):
            q, k, v = (w[:, tokens] for w in (attn.W_Q, attn.W_K, attn.W_V))
            scores = jax.nn.softmax(k.T @ q / jnp.sqrt(q.shape[0]), axis=0)
            a = self.readout.astype(v.dtype)
            return a @ (self.mlp @ (v @ jnp.sum(scores, axis=1)))

        return jax.vmap(one)(data["tokens"])


def equinox_loss(model, data):
    return jnp.mean(jax.nn.softplus(-data["y"] * model.output(data)))


def test_phases_of_an_equinox_transformer_with_selectors():
    """A selector PhaseSpec on an Equinox version of Yang et al.'s transformer
    finds the t1 of the built-in model (the same flow from the same start)."""
    builtin = CooccurrenceTransformer(d=16, L=4, m=16, m1=32)
    data = cooccurrence_data(jax.random.key(0), n=24, L=4, d=16)
    params0 = builtin.init(jax.random.key(1))
    ts = gflow.save_times(30.0, 61, t_first=1e-3)
    reference = gflow.simulate(builtin, data, 30.0, params0=params0, ts=ts)
    expected = gflow.detect_phases(reference, builtin, data)
    assert expected.found

    module = EquinoxCooccurrence(
        attn=Attention(params0["W_Q"], params0["W_K"], params0["W_V"]),
        mlp=params0["W"],
        readout=jnp.asarray(builtin.readout, jnp.int32),
    )
    traj = gflow.simulate(equinox_loss, data, 30.0, params0=module, ts=ts)
    margins_positive = gflow.classifier_alignment(lambda m, d: m.output(d))

    def aligned(m, d):  # the built-in test: margins, and the MLP's signs
        g = m.readout.astype(m.mlp.dtype) @ m.mlp @ m.attn.W_V
        return margins_positive(m, d) & (g[0] > 0) & (g[1] > 0) & (g[2] < 0)

    spec = gflow.PhaseSpec(
        attention=lambda m: (m.attn.W_Q, m.attn.W_K),
        mlp=("mlp", "attn.W_V"),
        products=((lambda m: m.attn.W_K, "attn.W_Q"),),
        alignment=aligned,
    )
    phases = gflow.detect_phases(traj, None, data, spec=spec)
    assert phases.found and phases.t1 == expected.t1
    np.testing.assert_allclose(
        phases.signals["attention_drift"],
        expected.signals["attention_drift"],
        rtol=1e-6,
    )


def test_a_spec_names_what_it_cannot_find():
    params = {"W_Q": jnp.ones((2, 2)), "W": jnp.ones((2, 2))}
    spec = gflow.PhaseSpec(attention="W_K", alignment=lambda p, d: True)
    with pytest.raises(ValueError, match=r"names parameters \['W_K'\].*\['W', 'W_Q'\]"):
        spec.check(params)
    spec = gflow.PhaseSpec(attention="attn.W_Q", alignment=lambda p, d: True)
    module = Attention(jnp.ones(2), jnp.ones(2), jnp.ones(2))
    with pytest.raises(ValueError, match="'attn.W_Q' does not name"):
        spec.check(module)
    with pytest.raises(ValueError, match="must select one matrix"):
        gflow.PhaseSpec(
            attention=(), products=((lambda m: m, "W_Q"),), alignment=lambda p, d: 1
        ).check(params)
    with pytest.raises(TypeError, match="alignment must be a function"):
        gflow.PhaseSpec(attention="W_Q")


def test_classifier_alignment_reads_margins_and_logits():
    scores = gflow.classifier_alignment(lambda p, d: p * d["x"])
    assert bool(scores(1.0, {"x": jnp.array([1.0, -2.0]), "y": jnp.array([1, -1])}))
    assert not bool(scores(1.0, {"x": jnp.array([1.0, 2.0]), "y": jnp.array([1, -1])}))
    logits = gflow.classifier_alignment(lambda p, d: d["z"], labels=lambda d: d["c"])
    z = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]])
    assert bool(logits(None, {"z": z, "c": jnp.array([0, 2])}))
    assert not bool(logits(None, {"z": z, "c": jnp.array([1, 2])}))


def loss(params, data):
    return 0.5 * jnp.mean((data["x"] @ params["w"] - data["y"]) ** 2)


def regression(n=16):
    x = jax.random.normal(jax.random.key(0), (n, 3))
    return {"x": x, "y": x @ jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.zeros(3)}


@pytest.mark.parametrize("entry", ["simulate", "gradient_descent"])
def test_nan_in_the_data_is_named(entry):
    data, params0 = regression()
    data["x"] = data["x"].at[3, 1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"`data` holds inf/NaN values: leaf \['x'\]"):
        if entry == "simulate":
            gflow.simulate(loss, data, 1.0, params0=params0, throw=False)
        else:
            gflow.gradient_descent(loss, data, 1.0, 0.1, params0=params0)
    with pytest.raises(ValueError, match="`params0` holds inf/NaN"):
        gflow.simulate(loss, regression()[0], 1.0, params0={"w": jnp.full(3, jnp.inf)})
    with pytest.raises(ValueError, match="the loss or its gradient is inf/NaN at the"):
        gflow.simulate(
            lambda p, d: jnp.log(p["w"][0]), None, 1.0, params0={"w": jnp.zeros(3)}
        )


def test_a_finite_time_blow_up_is_reported_where_it_happens():
    """L = −w³/3 from w = 10: dw/dt = w², w(t) = 1 / (0.1 − t) blows up at 0.1."""

    def cubic(params, data):
        return -jnp.sum(params["w"] ** 3) / 3

    for dtype in (jnp.float32, jnp.float64):
        traj = gflow.simulate(
            cubic, None, 1.0, params0={"w": jnp.asarray(10.0, dtype)}, throw=False
        )
        assert traj.result == "diverged"
        assert abs(float(traj.ts[-1]) - 0.1) < 1e-3
        assert traj.stats["num_steps"] <= 5000
        assert len(traj) >= 1 and "diverged" in traj.summary()
    with pytest.raises(gflow.SimulationError, match="diverged at t = 0.1"):
        gflow.simulate(cubic, None, 1.0, params0={"w": jnp.asarray(10.0)})


def test_every_failed_trajectory_keeps_its_start():
    """L = Σ sqrt(w) from w = 1e-3: the flow reaches w = 0 at t ≈ 2e-5, where the
    loss is undefined beyond."""

    def root(params, data):
        return jnp.sum(jnp.sqrt(params["w"]))

    w0 = jnp.full(2, 1e-3)
    traj = gflow.simulate(root, None, 1.0, params0={"w": w0}, throw=False)
    assert traj.result == "diverged" and len(traj) >= 1
    assert float(traj.ts[0]) == 0.0
    assert "result: diverged" in traj.summary()
    np.testing.assert_array_equal(traj.at(0.0)["w"], w0)


@pytest.mark.parametrize("lr", [0.0909, 0.35])
def test_flow_against_gradient_descent_for_any_learning_rate(lr):
    """The README's recipe, where the learning rate does not divide t_max."""
    data, params0 = regression()
    gd = gflow.gradient_descent(loss, data, 2.0, lr=lr, params0=params0)
    assert float(gd.ts[-1]) <= 2.0
    flow = gflow.simulate(loss, data, 2.0, params0=params0, ts=gd.ts)
    comparison = gflow.compare(flow, gd)
    assert len(comparison.ts) == len(gd.ts)
    assert comparison.max_param_distance < 0.5
    text = comparison.summary()
    assert "largest relative parameter distance" in text
    assert "Comparison" in repr(comparison) and str(len(gd.ts)) in repr(comparison)


def test_float64_numpy_parameters_and_data_warn_once_each(monkeypatch):
    # Without JAX's float64 mode, float64 NumPy inputs are computed in float32:
    # parameters and data are each named, once per process.
    monkeypatch.setattr(gflow._checks, "_WARNED", set())
    x = np.linspace(-1.0, 1.0, 8)
    data = (x, 2 * x)

    def loss(params, data):
        return jnp.mean((params["w"] * data[0] - data[1]) ** 2)

    def run(w):
        with jax.enable_x64(False):
            return gflow.simulate(loss, data, 1.0, params0={"w": w}, n_save=2)

    with pytest.warns(UserWarning) as first:
        run(np.zeros(()))
    named = sorted(str(w.message).split("`")[1] for w in first)
    assert named == ["data", "params0"]
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        run(np.zeros(()))


def test_parameters_of_mixed_precision_are_named():
    # A float32 array scaled by a NumPy float64 number is float64 under x64: the
    # tree mixes dtypes, which no run takes. Named before anything compiles.
    def loss(p, d):
        return jnp.sum((p["layers"][0]["w"] * d) ** 2) + jnp.sum(p["b"] ** 2)

    params0 = {
        "layers": [{"w": jnp.ones(3, jnp.float32) / np.sqrt(3)}],
        "b": jnp.zeros(2, jnp.float32),
    }
    message = r"mix floating dtypes \(\['b'\] is float32, \['layers'\]\[0\]\['w'\] is"
    for run in (
        gflow.simulate,
        lambda *a, **k: gflow.gradient_descent(*a, lr=0.1, **k),
    ):
        with pytest.raises(ValueError, match=message):
            run(loss, jnp.ones(3, jnp.float32), 1.0, params0=params0)
    batch = jax.tree.map(lambda x: jnp.stack([x, x]), params0)
    with pytest.raises(ValueError, match="mix floating dtypes"):
        gflow.simulate_ensemble(loss, jnp.ones(3, jnp.float32), 1.0, params0=batch)
