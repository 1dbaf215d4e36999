"""Pins on the internals of diffrax and equinox that `gflow._compat` relies on.

Each test says which upgrade moved what: gflow drives diffrax's solvers step by step
as `diffeqsolve` does, and must follow it when it changes.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gflow import _compat

UPGRADE = "diffrax changed; update gflow/_compat.py"


def _field(t, y, args):
    return -args * y + jnp.sin(t)


def test_implicit_solvers_take_the_controller_tolerances_as_diffeqsolve_does():
    from diffrax._root_finder import use_stepsize_tol

    solver = diffrax.Kvaerno5()
    assert solver.root_finder.rtol is use_stepsize_tol, UPGRADE
    controller = diffrax.PIDController(rtol=1e-7, atol=1e-9)
    tuned = _compat.with_controller_tolerances(solver, controller)
    assert tuned.root_finder.rtol == 1e-7 and tuned.root_finder.atol == 1e-9
    # An explicit solver, or a fixed step, is left as it is.
    tsit5 = diffrax.Tsit5()
    assert _compat.with_controller_tolerances(tsit5, controller) is tsit5
    fixed = _compat.with_controller_tolerances(solver, diffrax.ConstantStepSize())
    assert fixed.root_finder.rtol is use_stepsize_tol


def test_fsal_state_is_what_a_tsit5_step_carries():
    terms = diffrax.ODETerm(_field)
    y0, args = jnp.array([1.0, -2.0]), jnp.array([3.0, 0.5])
    solver = diffrax.Tsit5()
    state = solver.init(terms, 0.0, 0.1, y0, args)
    ours = _compat.fsal_state(_field(0.0, y0, args))
    assert jax.tree.structure(state) == jax.tree.structure(ours), UPGRADE
    # A step from our state equals a step from diffrax's own first state.
    step = solver.step(terms, 0.0, 0.1, y0, args, ours, False)
    first = solver.step(terms, 0.0, 0.1, y0, args, state, False)
    np.testing.assert_allclose(step[0], first[0], rtol=1e-14)
    # The state after a step holds the vector field at its end.
    np.testing.assert_allclose(
        _compat.fsal_value(step[3]), _field(0.1, step[0], args), rtol=1e-14
    )


def test_clip_to_end_is_diffrax_rule():
    from diffrax._integrate import _clip_to_end

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        t1 = jnp.asarray(rng.uniform(0.5, 100.0, 200), dtype)
        ulp = jnp.spacing(t1)
        tnext = t1 - ulp * jnp.asarray(rng.integers(-5, 300, 200), dtype)
        tprev = t1 * 0.5
        keep = jnp.asarray(rng.integers(0, 2, 200), bool)
        floor = t1
        for _ in range(100):
            floor = eqx.internal.prevbefore(floor)
        theirs = _clip_to_end(tprev, tnext, t1, floor, keep)
        ours = _compat.clip_to_end(tprev, tnext, t1, keep)
        np.testing.assert_array_equal(ours, theirs, err_msg=UPGRADE)


def test_unvmap_reduces_over_the_batch():
    flags = jnp.array([False, True, False])

    def probe(flag):
        return _compat.unvmap_any(flag), _compat.unvmap_all(flag)

    some, every = jax.vmap(probe)(flags)
    assert bool(some.all()) and not bool(every.any())
    assert bool(_compat.unvmap_any(jnp.asarray(True)))
