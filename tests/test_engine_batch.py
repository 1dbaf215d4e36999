"""The engine's helpers for batches of lanes: writing some lanes by a select
(`set_lanes`) and taking part of a lane's fields (`fields`, `with_fields`)."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from gflow._engine._batch import fields, set_lanes, with_fields
from gflow._tree import tree_set


class _Lanes(eqx.Module):
    t: jnp.ndarray
    y: dict
    flag: jnp.ndarray
    extra: object = None


def _lanes(n=6):
    return _Lanes(
        t=jnp.arange(n, dtype=jnp.float32),
        y={"w": jnp.arange(3 * n, dtype=jnp.float32).reshape(n, 3)},
        flag=jnp.zeros(n, bool),
    )


def _values(width=3):
    return _Lanes(
        t=-1.0 - jnp.arange(width, dtype=jnp.float32),
        y={"w": -jnp.ones((width, 3), jnp.float32) * jnp.arange(1, width + 1)[:, None]},
        flag=jnp.ones(width, bool),
    )


def test_set_lanes_writes_what_a_scatter_writes_and_drops_indices_past_the_end():
    lanes, values = _lanes(), _values()
    index = jnp.asarray([4, 6, 1])  # 6: past the end, dropped
    got = set_lanes(lanes, index, values)
    want = tree_set(lanes, index, values)
    for a, b in zip(
        (got.t, got.y["w"], got.flag), (want.t, want.y["w"], want.flag), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.t, [0, -3, 2, 3, -1, 5])
    np.testing.assert_array_equal(got.flag, [0, 1, 0, 0, 1, 0])


def test_set_lanes_broadcasts_a_value_without_the_batch_axis():
    lanes = _lanes()
    values = eqx.tree_at(lambda v: v.t, _values(), jnp.float32(7.0))
    got = set_lanes(lanes, jnp.asarray([0, 2, 6]), values)
    np.testing.assert_array_equal(got.t, [7, 1, 7, 3, 4, 5])


def test_fields_keep_only_the_named_fields_and_with_fields_puts_them_back():
    lanes = _lanes()
    part = fields(lanes, ("t", "flag"))
    assert part.y is None and part.extra is None
    np.testing.assert_array_equal(part.t, lanes.t)
    changed = eqx.tree_at(lambda p: p.t, part, part.t + 10)
    merged = with_fields(lanes, changed)
    np.testing.assert_array_equal(merged.t, lanes.t + 10)
    np.testing.assert_array_equal(merged.y["w"], lanes.y["w"])  # untouched
    np.testing.assert_array_equal(merged.flag, lanes.flag)
