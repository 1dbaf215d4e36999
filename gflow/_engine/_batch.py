"""Work on batches of lanes: per-lane functions applied to a batch, and loops that
serve the lanes that need something, a few at a time."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import tree_zeros


def where(pred, a, b):
    """Per lane: `a` where `pred`, else `b`. (A Python scalar in a lane's state,
    such as diffrax's PID `at_dtmin` flag, becomes an array where the other is.)"""

    pred = jnp.asarray(pred)

    def pick(x, y):
        if not (eqx.is_array(x) or eqx.is_array(y)):
            return x
        x, y = jnp.asarray(x), jnp.asarray(y)
        ndim = max(x.ndim, y.ndim)
        return jnp.where(pred.reshape(pred.shape + (1,) * (ndim - pred.ndim)), x, y)

    return jax.tree.map(pick, a, b)


def per_lane(fn: Callable, width: int) -> Callable:
    """`fn` of one lane, applied to `width` lanes (leading axis of every array).

    One lane is not vmapped, so that the solver's `lax.cond`s (e.g. whether to
    estimate the spectral radius, which method "auto" takes) stay branches instead
    of becoming selects that evaluate both sides.
    """
    if width > 1:
        return eqx.filter_vmap(fn)

    def one(*args):
        out = fn(*jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, args))
        return jax.tree.map(lambda x: x[None] if eqx.is_array(x) else x, out)

    return one


def if_any(mask, fn, *args):
    """`fn(*args)` if any of `mask` holds, else zeros like it: work for a batch of
    lanes is skipped when none of them needs it."""

    def skip(*args):
        return tree_zeros(eqx.filter_eval_shape(fn, *args))

    return jax.lax.cond(jnp.any(mask), lambda *a: fn(*a), skip, *args)


def select(mask, width):
    """Up to `width` lane indices where `mask` holds; the rest point past the end."""
    return jnp.nonzero(mask, size=width, fill_value=mask.shape[0])[0]


def for_some(pending: Callable, work: Callable, carry, width: int):
    """Apply `work(carry, lanes)` to the lanes where `pending(carry)`, `width` at a
    time, until none is pending. `work` must make progress on the lanes it gets."""

    def body(carry):
        return work(carry, select(pending(carry), width))

    return jax.lax.while_loop(lambda c: jnp.any(pending(c)), body, carry)


def fields(module: eqx.Module, names: Iterable[str]):
    """`module` with only the fields `names` (the others None): the part of the
    lanes' state that a loop serving a few lanes at a time reads, or writes.
    Gathering and scattering that part, instead of every leaf, keeps the program
    small: XLA compiles each gather and each scatter into a kernel of its own,
    and a lane's state has dozens of leaves (its solver's stages and controller,
    its counters)."""
    names = set(names)
    return dataclasses.replace(
        module,
        **{f.name: None for f in dataclasses.fields(module) if f.name not in names},
    )


def with_fields(module: eqx.Module, part: eqx.Module):
    """`module` with the fields that `part` (made by `fields`) holds."""
    return dataclasses.replace(
        module,
        **{
            f.name: getattr(part, f.name)
            for f in dataclasses.fields(part)
            if getattr(part, f.name) is not None
        },
    )


def set_lanes(lanes, index, values):
    """`lanes[index] = values` along the lane axis (indices past the end dropped),
    written as a select of every lane from its old value or its new one.

    A scatter per leaf would be a kernel of its own for each (XLA compiles every
    scatter apart), where selects of leaves of the same shape and dtype are one
    kernel, compiled once: a lane's state has dozens of leaves, most of them
    scalars. A lane is then read and written whole, which costs little beside the
    work that made the values."""
    n = jax.tree.leaves(lanes)[0].shape[0]
    width = index.shape[0]
    source = jnp.full((n,), width, jnp.int32)
    source = source.at[index].set(jnp.arange(width, dtype=jnp.int32), mode="drop")
    written = source < width
    source = jnp.minimum(source, width - 1)
    # (A leaf without the batch axis, such as a flag that was a Python scalar,
    # holds for every lane of the batch.)
    picked = jax.tree.map(lambda v: v[source] if jnp.ndim(v) else v, values)
    return where(written, picked, lanes)
