"""Small pytree utilities: a portable JSON description of plain pytrees."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def tree_norm(tree: Any) -> jax.Array:
    """The Euclidean norm of all leaves of `tree` taken together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


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
