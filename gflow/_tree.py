"""Small pytree utilities: vector arithmetic on pytrees, scatter and gather of
leading axes, and a portable JSON description of plain pytrees. A leaf module."""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp


def like_dtype(x: Any, tree: Any) -> jax.Array:
    """`x` in the floating-point dtype of `tree` (a float32 run stays float32)."""
    return jnp.asarray(x, jnp.result_type(*jax.tree.leaves(tree)))


def tree_norm(tree: Any) -> jax.Array:
    """The Euclidean norm of all leaves of `tree` taken together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def tree_dot(a: Any, b: Any) -> jax.Array:
    """The inner product of two pytrees of the same structure, as flat vectors."""
    return sum(
        jnp.sum(x * y) for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True)
    )


def tree_unit(tree: Any) -> Any:
    """`tree / ‖tree‖`; zero stays zero. Scaled by its largest entry first, so that
    a tree of tiny (or huge) entries, whose norm would underflow (or overflow) in
    float32, still gives a unit vector and not inf/NaN."""
    largest = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree)]
    )
    scaled = jax.tree.map(lambda x: x / jnp.where(largest > 0, largest, 1), tree)
    norm = tree_norm(scaled)
    return jax.tree.map(lambda x: x / jnp.where(norm > 0, norm, 1), scaled)


def tree_combination(*terms: tuple[Any, Any]) -> Any:
    """Σ coefficient · tree over `(coefficient, tree)` pairs."""
    (c0, t0), *rest = terms
    out = jax.tree.map(lambda x: c0 * x, t0)
    for c, t in rest:
        out = jax.tree.map(lambda o, x, c=c: o + c * x, out, t)
    return out


def tree_random_normal(key: jax.Array, like: Any) -> Any:
    """Standard normal leaves of the shapes and dtypes of `like`'s leaves."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


def tree_scrambled(like: Any) -> Any:
    """A fixed vector of the shapes of `like`'s leaves whose entries look random
    (a sine hash of their positions, in [-0.5, 0.5)): a start for a power
    iteration that has a component along every eigenvector, at the cost of a few
    arithmetic operations (no random-number generator in the program)."""
    leaves, treedef = jax.tree.flatten(like)
    out, offset = [], 0
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        index = jnp.arange(offset, offset + jnp.size(leaf), dtype=dtype) + 1
        hashed = jnp.sin(index * 12.9898) * 43758.5453
        out.append(jnp.reshape(hashed - jnp.floor(hashed) - 0.5, jnp.shape(leaf)))
        offset += jnp.size(leaf)
    return jax.tree.unflatten(treedef, out)


def tree_take(tree: Any, index: Any) -> Any:
    """`tree[index]` along the leading axis of every array leaf."""
    return jax.tree.map(lambda x: x[index] if eqx.is_array(x) else x, tree)


def tree_set(tree: Any, index: Any, values: Any) -> Any:
    """`tree[index] = values` for every array leaf; indices out of range dropped."""
    return jax.tree.map(
        lambda x, v: x.at[index].set(v, mode="drop") if eqx.is_array(x) else x,
        tree,
        values,
    )


def structure_to_json(tree: Any) -> Any:
    """Describe a pytree of dicts (string keys), lists, tuples and None as JSON.

    Leaves become `{"leaf": i}` with `i` their position in `jax.tree.leaves(tree)`,
    so the structure can be rebuilt with `structure_from_json` on any machine, with
    no pickling.
    """
    counter = iter(range(len(jax.tree.leaves(tree))))

    def encode(node: Any) -> Any:
        if node is None:
            return {"none": True}
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise TypeError("only dicts with string keys can be saved.")
            # jax flattens dicts in sorted key order; keep that order.
            return {"dict": {k: encode(node[k]) for k in sorted(node)}}
        if isinstance(node, list | tuple) and type(node) in (list, tuple):
            return {type(node).__name__: [encode(x) for x in node]}
        if jax.tree_util.all_leaves([node]):
            return {"leaf": next(counter)}
        raise TypeError(
            f"a pytree node of type {type(node).__name__} cannot be saved portably; "
            "use dicts, lists and tuples of arrays."
        )

    return encode(tree)


def structure_from_json(description: Any, leaves: list) -> Any:
    """Inverse of `structure_to_json`, given the leaves in order."""
    ((kind, value),) = description.items()
    if kind == "none":
        return None
    if kind == "leaf":
        return leaves[value]
    if kind == "dict":
        return {k: structure_from_json(v, leaves) for k, v in value.items()}
    if kind in ("list", "tuple"):
        items = [structure_from_json(v, leaves) for v in value]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown pytree node kind {kind!r} in a saved trajectory.")


def tree_zeros(struct, lead=(), xp=jnp):
    """Zeros shaped like `struct` (ShapeDtypeStructs) with leading axes `lead`;
    Python scalars (fixed flags in a solver's state) become arrays of them, so that
    every leaf of the loop's carry is an array with the leading axes. `xp=np`
    makes them on the host (nothing compiles)."""

    def leaf(s):
        if isinstance(s, jax.ShapeDtypeStruct):
            return xp.zeros(lead + s.shape, s.dtype)
        return xp.full(lead, s)

    return jax.tree.map(leaf, struct)
