"""Basins of attraction: grids of initial parameters, and the limit of each flow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._trajectory import Trajectory


def grid(axes: Mapping[str, Any]) -> dict[str, Any]:
    """Every combination of values of named scalar parameters, as a batch.

    Args:
        axes: `{name: 1-D values}`, e.g. `{"e": es, "w": ws}`.

    Returns:
        `{name: (N,) array}` with `N` the product of the lengths, in row-major
        order (the last name varies fastest, as `np.meshgrid(..., indexing="ij")`
        then `ravel()`): `values.reshape(len(es), len(ws))` gives the plane back.
        Pass it as `params0` to `gflow.simulate_ensemble`.

    Examples:
        >>> params0 = gflow.grid({"e": jnp.linspace(-2, 2, 3), "w": jnp.zeros(2)})
        >>> params0["e"]
        Array([-2., -2.,  0.,  0.,  2.,  2.], dtype=float32)
    """
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError("`axes` must be a non-empty dict {name: 1-D values}.")
    values = {}
    for name, v in axes.items():
        v = jnp.asarray(v)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(
                f"`axes[{name!r}]` must be a non-empty 1-D array; got shape {v.shape}."
            )
        values[name] = v
    mesh = jnp.meshgrid(*values.values(), indexing="ij")
    return {name: m.ravel() for name, m in zip(values, mesh, strict=True)}


class Basins(eqx.Module):
    """Which reference value each member's flow ended at.

    Attributes:
        labels: `(B,)` ints: the index in `names` of the nearest reference to the
            member's final loss, or -1 when the member failed or ended farther than
            `atol` from every reference (unresolved).
        names: the reference names, in the order of `references`.
        references: `{name: loss}` as given.
        final_loss: `(B,)` each member's final loss.
    """

    labels: np.ndarray
    names: tuple[str, ...]
    references: dict[str, float]
    final_loss: np.ndarray

    @property
    def counts(self) -> dict[str, int]:
        """Members per basin (and `"unresolved"`)."""
        counts = {n: int(np.sum(self.labels == i)) for i, n in enumerate(self.names)}
        counts["unresolved"] = int(np.sum(self.labels < 0))
        return counts

    @property
    def fractions(self) -> dict[str, float]:
        """The fraction of members in each basin (and `"unresolved"`)."""
        return {k: v / self.labels.size for k, v in self.counts.items()}

    def mask(self, name: str) -> np.ndarray:
        """`(B,)` bools: the members whose flow ended at reference `name`."""
        if name not in self.names:
            raise ValueError(f"no basin named {name!r}; the basins are {self.names}.")
        return self.labels == self.names.index(name)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k} {v:.1%}" for k, v in self.fractions.items())
        return f"Basins({self.labels.size} members: {parts})"


def basins(
    trajectory: Trajectory,
    references: Mapping[str, float],
    *,
    atol: float | None = None,
) -> Basins:
    """Label each member of an ensemble by the reference its final loss is nearest.

    Gradient flow never increases the loss, so the final loss tells apart limits
    with different losses (e.g. a local and a global minimum). Run the ensemble long
    enough (or with `stop_at_grad_norm`, or `stop_at_loss` just below the higher
    reference: once a member's loss is below it, it can never come back).

    Args:
        trajectory: a batched Trajectory from `gflow.simulate_ensemble`.
        references: `{name: loss}` of the limits, e.g. `{"local": 0.666,
            "global": 0.619}`.
        atol: members whose final loss is farther than this from every reference
            are labelled -1 (unresolved). Default: no limit.

    Returns:
        A [`gflow.Basins`][]: `labels`, `counts`, `fractions`, `mask(name)`.

    Examples:
        >>> local, bigram = gflow.models.markov_reference_losses(0.5, 0.8)
        >>> b = gflow.basins(ens, {"local": local, "global": bigram}, atol=1e-3)
        >>> b.fractions["global"], b.labels.reshape(200, 200)
    """
    if trajectory.batch_size is None:
        raise TypeError(
            "`trajectory` must be an ensemble from gflow.simulate_ensemble; for one "
            "run compare traj.loss[-1] with the references directly."
        )
    if not isinstance(references, Mapping) or not references:
        raise ValueError("`references` must be a non-empty dict {name: loss}.")
    names = tuple(str(k) for k in references)
    ref = np.array([float(v) for v in references.values()])
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"`references` must be finite numbers; got {references}.")
    if atol is not None and not atol > 0:
        raise ValueError(f"`atol` must be positive or None; got {atol!r}.")
    final = np.asarray(trajectory.loss[:, -1], dtype=np.float64)
    distance = np.abs(final[:, None] - ref[None, :])
    labels = np.argmin(distance, axis=1)
    unresolved = ~np.asarray(trajectory.succeeded)
    if atol is not None:
        unresolved |= distance.min(axis=1) > atol
    labels = np.where(unresolved, -1, labels)
    return Basins(
        labels=labels,
        names=names,
        references={n: float(v) for n, v in zip(names, ref, strict=True)},
        final_loss=final,
    )
