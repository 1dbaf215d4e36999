"""Each bad input raises a clear error that names the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow


def loss(params, data):
    return 0.5 * jnp.sum((params["w"] @ data["x"] - data["y"]) ** 2)


PARAMS0 = {"w": jnp.ones((2, 3))}
DATA = {"x": jnp.ones((3, 4)), "y": jnp.zeros((2, 4))}


# Each bad option that several entry points share, with the error it must raise.
# The table drives every entry point that takes the option (below).
SHARED = [
    (dict(t_max=0.0), ValueError, "`t_max` must be positive and finite"),
    (dict(t_max=-1.0), ValueError, "`t_max` must be positive"),
    (dict(t_max=float("inf")), ValueError, "`t_max` must be positive and finite"),
    (dict(t_max=float("nan")), ValueError, "`t_max`"),
    (dict(t_max="soon"), TypeError, "`t_max` must be a positive real number"),
    (dict(t_max="1.5"), TypeError, "`t_max` must be a positive real number"),
    (dict(ts=np.zeros((2, 2))), ValueError, "`ts` must be a 1-D array"),
    (dict(ts=[0.0, 0.5, 0.5, 1.0]), ValueError, "strictly increasing"),
    (dict(ts=[0.1, 0.5, 1.0]), ValueError, "`ts` must start at 0"),
    (dict(ts=[0.0, 0.5, 2.0]), ValueError, "`ts` must end at t_max"),
    (dict(ts=[0.0]), ValueError, "at least two times"),
    (dict(n_save=1), ValueError, "`n_save` must be an integer >= 2"),
    (dict(spacing="cubic"), ValueError, "`spacing` must be 'log' or 'linear'"),
    (dict(params_at="some"), ValueError, "`params_at` must be 'all', 'final'"),
    (dict(params_at=[0.3]), ValueError, "`params_at` times .* are not among"),
    (dict(params0=None), ValueError, "`params0` is required"),
    (dict(params0={"w": jnp.ones((2, 3), jnp.int32)}), TypeError, r"leaf \['w'\]"),
    (dict(params0={"w": "weights"}), TypeError, "no floating-point array leaf"),
    (dict(params0={}), ValueError, "no array leaves"),
    (
        dict(data={"x": jnp.ones((5, 4)), "y": jnp.zeros((2, 4))}),
        ValueError,
        r"loss\(params, data\) failed on the given parameters and data",
    ),
    (
        dict(model=lambda p, d: p["w"] * 2),
        ValueError,
        r"must return a scalar; it returned \(2, 3\)",
    ),
    (
        dict(model=lambda p, d: loss(jax.pure_callback(np.tanh, p, p), d)),
        ValueError,
        r"loss\(params, data\) runs, but its gradient .* failed",
    ),
    (dict(model=42), TypeError, "`model` must be an object with a `loss"),
    (dict(metrics={"m": 3}), TypeError, "`metrics` must be a dict"),
    (dict(metrics=[loss]), TypeError, "`metrics` must be a dict"),
    (dict(metrics={"boom": lambda p, d: p["nope"]}), ValueError, "metric 'boom'"),
    (dict(matmul_precision="max"), ValueError, "`matmul_precision` must be one"),
    (dict(rtoll=1e-3), TypeError, "unexpected keyword argument `rtoll`"),
]
# Options of the flows (simulate and simulate_ensemble), not of gradient descent.
FLOW_ONLY = [
    (dict(solver="rk99"), ValueError, "`solver` must be one of"),
    (dict(solver="euler"), ValueError, "pass `dt0=`"),
    (dict(rtol=0.0), ValueError, "`rtol` must be a positive finite number"),
    (dict(atol=-1.0), ValueError, "`atol` must be a positive finite number"),
    (dict(rtol="1e-3"), ValueError, "`rtol` must be a positive finite number"),
    (dict(dt0=-0.1), ValueError, "`dt0` must be a positive finite number"),
    (dict(max_steps=0), ValueError, "`max_steps` must be at least 1"),
    (dict(max_steps=1.5), TypeError, "`max_steps` must be an int"),
    (dict(stop_at_grad_norm=0.0), ValueError, "`stop_at_grad_norm` must be positive"),
    (
        dict(stop_at_loss=float("nan")),
        ValueError,
        "`stop_at_loss` must be a finite number",
    ),
    (dict(stop_when=3), TypeError, "`stop_when` must be a function"),
]


def call(entry, **kwargs):
    """Call an entry point on the test problem, with `kwargs` changed."""
    args = dict(model=loss, data=DATA, t_max=1.0, params0=PARAMS0)
    args.update(kwargs)
    model, data, t_max = args.pop("model"), args.pop("data"), args.pop("t_max")
    if entry == "simulate_ensemble" and args.get("params0"):  # a batch of two
        args["params0"] = jax.tree.map(lambda x: np.stack([x, x]), args["params0"])
    if entry == "gradient_descent":
        return gflow.gradient_descent(model, data, t_max, 0.1, **args)
    return getattr(gflow, entry)(model, data, t_max, **args)


def run(**kwargs):
    return call("simulate", **kwargs)


@pytest.mark.parametrize("entry", ["simulate", "simulate_ensemble", "gradient_descent"])
@pytest.mark.parametrize("kwargs, error, match", SHARED)
def test_bad_shared_options(entry, kwargs, error, match):
    with pytest.raises(error, match=match):
        call(entry, **kwargs)


@pytest.mark.parametrize("entry", ["simulate", "simulate_ensemble"])
@pytest.mark.parametrize("kwargs, error, match", FLOW_ONLY)
def test_bad_flow_options(entry, kwargs, error, match):
    with pytest.raises(error, match=match):
        call(entry, **kwargs)


def test_gradient_descent_takes_no_solver_options():
    with pytest.raises(TypeError, match="unexpected keyword argument `rtol`"):
        call("gradient_descent", rtol=1e-3)


def test_truncated_or_foreign_trajectory_files(tmp_path):
    path = tmp_path / "run.npz"
    run().save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz.*not a complete gflow trajectory"):
        gflow.Trajectory.load(cut)
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match=r"notes\.npz"):
        gflow.Trajectory.load(text)


def test_model_without_key():
    class Model:
        def init(self, key):
            return PARAMS0

        def loss(self, params, data):
            return loss(params, data)

    with pytest.raises(ValueError, match="pass `key=`"):
        gflow.simulate(Model(), DATA, 1.0)
    with pytest.raises(TypeError, match="`key` must be an int seed"):
        gflow.simulate(Model(), DATA, 1.0, key="seed")
    assert gflow.simulate(Model(), DATA, 1.0, key=0).result == "successful"


def test_at_outside_the_saved_times():
    traj = run()
    with pytest.raises(ValueError, match="within the saved times"):
        traj.at(2.0)


def test_integer_index_is_refused():
    with pytest.raises(TypeError, match="slice"):
        run()[3]
