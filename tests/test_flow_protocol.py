"""The flow protocol (gflow.flows.AbstractFlow): a flow written outside gflow with
its own integrated variables and a carried state, its closed form and exact work
counts; the split between what is integrated and what is carried; abstract/final."""

import inspect
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import gflow
from gflow import flows
from gflow.flows import AbstractFlow, FlowState, Work

A, GAMMA = 4.0, 1.0  # curvature of the loss, damping of the oscillator


def quadratic(params, data):
    return 0.5 * A * params["x"] ** 2


class DampedOscillator(AbstractFlow):
    """x'' + γ x' = −∇L(x), as (x, v): the velocity v is the flow's own variable.
    It carries the curvature along v, a Rayleigh quotient measured after every
    step attempt (one Hessian-vector product), and saves it as a metric."""

    gamma: float
    cost: ClassVar[Work] = Work(grads=1)
    gradient_field: ClassVar[bool] = False

    def init(self, loss_fn, params, data):
        v = jax.tree.map(jnp.zeros_like, params)
        return FlowState(params, {"v": v}), jnp.zeros(()), Work()

    def vector_field(self, loss_fn):
        def field(t, state, data, carried):
            g = flows.grad(loss_fn, state.params, data)
            v = state.extra["v"]
            dv = jax.tree.map(lambda g, v: -g - self.gamma * v, g, v)
            return FlowState(v, {"v": dv})

        return field

    def evaluation_cost(self, carried):
        return self.cost

    def row(self, loss_fn, t, state, carried, data, loss, grad):
        return state.extra["v"], {"curvature": carried}, Work()

    def update(self, loss_fn, t, state, carried, data):
        v = state.extra["v"]
        hv = ravel_pytree(flows.hvp(loss_fn, state.params, data, v))[0]
        v = ravel_pytree(v)[0]
        vv = v @ v
        quotient = jnp.where(vv > 0, v @ hv / jnp.where(vv > 0, vv, 1), carried)
        return quotient, Work(hvps=1)

    def check(self, trajectory):
        pass


def exact(t):
    """x'' + γ x' + a x = 0 from x = 1, x' = 0 (underdamped): (x, x')."""
    omega = np.sqrt(A - GAMMA**2 / 4)
    decay = np.exp(-GAMMA * t / 2)
    x = decay * (np.cos(omega * t) + GAMMA / (2 * omega) * np.sin(omega * t))
    v = -decay * (A / omega) * np.sin(omega * t)
    return x, v


def test_a_flow_written_outside_gflow_follows_its_closed_form_with_exact_counts():
    traj = gflow.simulate(
        quadratic,
        None,
        6.0,
        params0={"x": jnp.asarray(1.0)},
        flow=DampedOscillator(GAMMA),
        n_save=25,
        rtol=1e-10,
        atol=1e-12,
    )
    x, v = exact(np.asarray(traj.ts))
    np.testing.assert_allclose(traj.params["x"], x, atol=1e-8)
    # Its own variable is saved at the rows, and is its dθ/dt.
    np.testing.assert_allclose(traj.state["v"]["x"], v, atol=1e-8)
    np.testing.assert_allclose(traj.velocity["x"], v, atol=1e-8)
    # What it carries is the curvature A, measured after each step attempt and
    # passed to the rows of the next step (0 before the first one ends); it is
    # not integrated, so nothing interpolates it.
    curvature = np.asarray(traj.metrics["curvature"])
    assert curvature[0] == 0 and curvature[-1] == pytest.approx(A, rel=1e-12)
    assert np.all((curvature == 0) | np.isclose(curvature, A, rtol=1e-12))
    s = traj.stats
    # One Hessian-vector product per step attempt (`update`), none elsewhere.
    assert s["num_hvp_evals"] == s["num_steps"]
    # Tsit5 ("auto" for a field that is not a gradient): 6 per attempt, one for
    # the first step's size; the first row's velocity is not the field (the state
    # is more than the parameters), so the start evaluates it: one more.
    assert s["num_solver_grad_evals"] == 6 * s["num_steps"] + 2


def test_carried_state_is_kept_only_with_accepted_steps():
    class Counting(DampedOscillator):  # (tests only: flows are final)
        def update(self, loss_fn, t, state, carried, data):
            return carried + 1, Work()

        def row(self, loss_fn, t, state, carried, data, loss, grad):
            return state.extra["v"], {"accepted_before": carried}, Work()

    traj = gflow.simulate(
        quadratic,
        None,
        6.0,
        params0={"x": jnp.asarray(1.0)},
        flow=Counting(GAMMA),
        n_save=2,
        rtol=1e-4,
        atol=1e-6,
        dt0=3.0,  # too long a first step: rejected attempts, whose updates go
    )
    assert traj.stats["num_rejected_steps"] > 0
    # The last row lies in the last step, which began after all the others.
    accepted = traj.stats["num_accepted_steps"]
    assert int(traj.metrics["accepted_before"][-1]) == accepted - 1


def test_heavy_ball_velocity_is_its_saved_state():
    traj = gflow.simulate(
        quadratic,
        None,
        3.0,
        params0={"x": jnp.asarray(1.0)},
        flow=flows.HeavyBall(0.1, 0.5),
        n_save=9,
    )
    assert set(traj.state) == {"u"}
    np.testing.assert_array_equal(traj.state["u"]["x"], traj.velocity["x"])


def test_ensembles_save_a_flows_state_per_member_and_load_it_back(tmp_path):
    x0 = jnp.asarray([1.0, -0.5, 2.0])
    ens = gflow.simulate_ensemble(
        quadratic, None, 2.0, params0={"x": x0}, flow=DampedOscillator(GAMMA),
        n_save=5, rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    _, v = exact(np.asarray(ens.ts[0]))
    np.testing.assert_allclose(ens.state["v"]["x"], x0[:, None] * v, atol=1e-8)
    np.testing.assert_allclose(ens.member(2).state["v"]["x"], 2 * v, atol=1e-8)
    ens.save(tmp_path / "ens.npz")
    loaded = gflow.Trajectory.load(tmp_path / "ens.npz")
    np.testing.assert_array_equal(loaded.state["v"]["x"], ens.state["v"]["x"])


def test_work_adds_and_multiplies():
    assert Work(grads=1, hvps=2) * 3 + Work(thirds=1) == Work(3, 6, 1)
    assert 2 * Work(1, 0, 1) == Work(2, 0, 2)


def test_an_incomplete_flow_cannot_be_made():
    class Incomplete(AbstractFlow):
        cost: ClassVar[Work] = Work(grads=1)
        gradient_field: ClassVar[bool] = True

        def vector_field(self, loss_fn):
            return lambda t, state, data, carried: state

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def _gflow_flows():
    return [
        c
        for c in vars(flows).values()
        if inspect.isclass(c) and issubclass(c, AbstractFlow)
    ]


def test_flows_are_abstract_or_final_and_override_nothing_concrete():
    """Equinox's abstract/final pattern: a flow implements the abstract members,
    and neither it nor any other gflow flow overrides a concrete one."""
    concrete = {
        name
        for name, member in vars(AbstractFlow).items()
        if not name.startswith("_")
        and not getattr(member, "__isabstractmethod__", False)
        and (callable(member) or isinstance(member, property))
    }
    assert {"field", "terms", "is_sde"} <= concrete
    for flow in _gflow_flows():
        if inspect.isabstract(flow):
            assert flow.__name__.startswith("Abstract")
            continue
        assert not flow.__name__.startswith("Abstract")
        overridden = concrete & set(vars(flow))
        assert not overridden, (flow.__name__, overridden)
        subclasses = [
            c for c in _gflow_flows() if c is not flow and issubclass(c, flow)
        ]
        assert not subclasses, (flow.__name__, "is final")
