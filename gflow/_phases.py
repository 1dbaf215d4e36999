"""The phase detector: split a trajectory into Phase 1 and Phase 2 with numbers.

Phase 1 (Yang et al.): the MLP aligns with the target signals (every sample
classified correctly, the MLP's values on the signal words with the right signs)
while the attention stays near its initial value. Phase 2: attention and MLP move
together. The detector watches exactly these two signals on a saved trajectory:

* alignment(t): a boolean the model declares (`PhaseSpec.alignment`);
* attention drift(t): the largest relative change since t = 0 of the attention
  matrices and of the products it declares (e.g. W_Kᵀ W_Q, W_Vᵀ W_V).

Phase 1 ends at the first save where alignment holds (and keeps holding) while the
drift is still below `drift_threshold`; if alignment comes only after the attention
has already moved, or never, there is no two-phase structure and the detector says
so rather than inventing a boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._declarations import PhaseSpec, Selector, describe, matrix, select
from ._trajectory import Trajectory
from .metrics import effective_rank, row_condensation


class Phases(eqx.Module):
    """The phases found in a trajectory (see `detect_phases`).

    Attributes:
        t1: the end of the first phase (None when there is no phase structure).
        t2: the end of the second phase, where meaningful (else None).
        labels: a label per save time (e.g. "phase 1", "phase 2").
        signals: the signals used, each an array over the save times.
        ts: the save times.
        found: whether a phase boundary was found.
        reason: a sentence saying why (or why not).
    """

    t1: float | None
    t2: float | None
    labels: tuple[str, ...]
    signals: dict[str, np.ndarray]
    ts: np.ndarray
    found: bool
    reason: str

    def summary(self) -> str:
        """A readable account of the phases and of the signals at the boundaries."""
        lines = [self.reason]
        if self.found:
            names = sorted(set(self.labels), key=self.labels.index)
            for name in names:
                where = np.nonzero(np.array(self.labels) == name)[0]
                first, last = self.ts[where[0]], self.ts[where[-1]]
                lines.append(
                    f"  {name}: t in [{first:.4g}, {last:.4g}] ({len(where)} saves)"
                )
        return "\n".join(lines)


def _relative_drift(values: list[np.ndarray]) -> np.ndarray:
    """‖x(t) − x(0)‖ / ‖x(0)‖ of arrays with a leading time axis, taken together."""
    flat = np.concatenate([np.reshape(v, (len(v), -1)) for v in values], axis=1)
    return np.linalg.norm(flat - flat[0], axis=1) / np.linalg.norm(flat[0])


def _over_rows(fn, params, *args):
    """`fn(params_t, *args)` at every row of parameters with a leading time axis
    (any pytree: the trained leaves have the time axis, the leaves held fixed are
    shared)."""
    rows = jax.tree.map(lambda x: 0 if eqx.is_inexact_array(x) else None, params)
    in_axes = (rows,) + (None,) * len(args)
    return eqx.filter_vmap(fn, in_axes=in_axes)(params, *args)


def first_row(params: Any) -> Any:
    """The parameters at the first row (the leaves held fixed as they are)."""
    return jax.tree.map(lambda x: x[0] if eqx.is_inexact_array(x) else x, params)


def attention_drift(spec: PhaseSpec, params: Any) -> np.ndarray:
    """The largest relative drift since t = 0, at every row of `params` (leading
    time axis), of the attention parameters and the products a spec declares (0
    when it declares none)."""
    drifts = [
        _relative_drift(_over_rows(lambda p, s=sel: select(p, s), params))
        for sel in spec.attention
    ]
    for a, b in spec.products:

        def product(p, a=a, b=b):
            return matrix(p, a, "PhaseSpec.products").T @ matrix(
                p, b, "PhaseSpec.products"
            )

        drifts.append(_relative_drift([np.asarray(_over_rows(product, params))]))
    if not drifts:
        return np.zeros(
            len(jax.tree.leaves(eqx.filter(params, eqx.is_inexact_array))[0])
        )
    return np.max(np.stack(drifts), axis=0)


def _require_saves(traj: Trajectory, minimum: int = 3) -> None:
    if not isinstance(traj, Trajectory):
        raise TypeError(f"expected a gflow.Trajectory; got {type(traj).__name__}.")
    if len(traj) < minimum:
        raise ValueError(
            f"the trajectory has {len(traj)} saved points; at least {minimum} are "
            "needed to tell phases apart. Simulate with more save times (n_save=)."
        )


def detect_phases(
    traj: Trajectory,
    model: Any,
    data: Any,
    *,
    spec: PhaseSpec | None = None,
    drift_threshold: float = 0.01,
) -> Phases:
    """Split a trajectory into Phase 1 (MLP alignment, attention still) and Phase 2.

    Args:
        traj: a trajectory of the model (more saves resolve the boundary better;
            log-spaced saves suit the fast Phase 1).
        model: the model; its `phase_spec` is used unless `spec` is given.
        data: the training data (the alignment test needs it).
        spec: what to watch (a `PhaseSpec`).
        drift_threshold: the largest relative attention drift still counted as
            "attention unchanged". Default 0.01: Yang et al. show the attention
            inner products within o(1) of their initial values in Phase 1; at their
            scale the flow has drifted by 3e-4 when alignment is reached, so 1%
            separates the phases with a wide margin.

    Returns:
        A `Phases` with `t1`, per-save `labels`, the `signals` (alignment,
        attention_drift) and a `summary()`.

    Raises:
        ValueError: a spec naming missing parameters, too few saves, a non-positive
            threshold, or an alignment test that does not return one boolean.
    """
    _require_saves(traj)
    spec = spec if spec is not None else getattr(model, "phase_spec", None)
    if spec is None:
        raise ValueError(
            f"{type(model).__name__} declares no phase_spec: pass spec=PhaseSpec(...)."
        )
    if not drift_threshold > 0:
        raise ValueError(f"`drift_threshold` must be positive; got {drift_threshold}.")
    spec.check(first_row(traj.params))
    aligned = np.asarray(_over_rows(spec.alignment, traj.params, data))
    if aligned.ndim == 0:  # the same at every row (a test that ignores params)
        aligned = np.broadcast_to(aligned, (len(traj),))
    if aligned.shape != (len(traj),) or aligned.dtype != bool:
        raise ValueError(
            "PhaseSpec.alignment must return one boolean per state; it returned "
            f"{aligned.dtype} values of shape {aligned.shape[1:]}."
        )
    drift = attention_drift(spec, traj.params)
    ts = np.asarray(traj.ts)
    signals = {"alignment": aligned, "attention_drift": drift}

    def no_phases(reason):
        return Phases(None, None, ("no phases",) * len(ts), signals, ts, False, reason)

    if not aligned.any():
        return no_phases(
            "No phases: the MLP never aligned with the signals over t in "
            f"[0, {ts[-1]:.4g}] (alignment never held)."
        )
    # Alignment must hold from its first time on (no flickering at the boundary).
    stays = np.flip(np.logical_and.accumulate(np.flip(aligned)))
    i1 = int(np.argmax(stays))
    if drift[i1] >= drift_threshold:
        return no_phases(
            f"No phases: alignment is reached at t = {ts[i1]:.4g}, but the attention "
            f"has by then drifted by {drift[i1]:.3g} (≥ {drift_threshold}): "
            "attention and MLP move together from the start."
        )
    labels = tuple("phase 1" if i <= i1 else "phase 2" for i in range(len(ts)))
    growth = drift[-1] / max(drift[i1], np.finfo(float).tiny)
    return Phases(
        t1=float(ts[i1]),
        t2=None,
        labels=labels,
        signals=signals,
        ts=ts,
        found=True,
        reason=(
            f"Phase 1 ends at t1 = {ts[i1]:.4g}: the MLP is aligned while the "
            f"attention has drifted by only {drift[i1]:.3g} (< {drift_threshold}); "
            f"over Phase 2 the drift grows {growth:.3g}-fold to {drift[-1]:.3g}."
        ),
    )


def classifier_alignment(output: Callable, labels: str | Callable = "y") -> Callable:
    """An alignment test for a classifier: every training example is classified
    correctly (every margin positive), for `PhaseSpec(alignment=...)` or
    `stop_when=`.

    Args:
        output: `output(params, data)`: the model's outputs on the training
            examples: `(n,)` real scores for labels ±1 (margin `y·output`), or
            `(n, C)` logits for integer class labels (margin: the true class's
            logit minus the largest other).
        labels: where the labels are: a key of `data` (default `"y"`), or a
            function `labels(data)`.

    Returns:
        `fn(params, data) -> bool`.

    Examples:
        >>> spec = gflow.PhaseSpec(
        ...     attention="attn", mlp="mlp",
        ...     alignment=gflow.classifier_alignment(model_output))
    """
    if not callable(output):
        raise TypeError("`output` must be a function output(params, data).")
    if not (isinstance(labels, str) or callable(labels)):
        raise TypeError("`labels` must be a key of the data or a function of it.")

    def aligned(params, data):
        scores = jnp.asarray(output(params, data))
        y = data[labels] if isinstance(labels, str) else labels(data)
        y = jnp.asarray(y)
        if scores.ndim == 1:
            margins = y * scores
        elif scores.ndim == 2:
            y = y.astype(jnp.int32)
            true = jnp.take_along_axis(scores, y[:, None], axis=1)[:, 0]
            others = jnp.where(
                jax.nn.one_hot(y, scores.shape[1], dtype=bool), -jnp.inf, scores
            )
            margins = true - jnp.max(others, axis=1)
        else:
            raise ValueError(
                "classifier_alignment: `output` must return (n,) scores or (n, C) "
                f"logits; it returned shape {scores.shape}."
            )
        return jnp.all(margins > 0)

    return aligned


def detect_condensation_stages(
    traj: Trajectory,
    *,
    outer: tuple[Selector, ...] = ("W_V", "W1"),
    key_query: Selector = "W_Q",
    condensation_threshold: float = 0.9,
) -> Phases:
    """Chen & Luo's stages from the condensation and effective-rank signals.

    Stage 1 (condensation) ends at the first save where every matrix in `outer` has
    mean |row cosine similarity| above `condensation_threshold`; stage 2 (key–query
    rank collapse) ends where the effective rank of `key_query` is smallest after
    that; the rest is "further training". The matrices are named by selectors, as
    in `gflow.PhaseSpec` (names, paths, or functions of the parameters).

    Returns:
        A `Phases` with `t1` (condensed), `t2` (rank collapse), labels
        "condensation", "rank collapse", "further training" and the signals.
    """
    _require_saves(traj)
    for selector in (*outer, key_query):
        matrix(first_row(traj.params), selector, "detect_condensation_stages")

    def over_rows(fn, selector):
        def one(params):
            return fn(matrix(params, selector, "detect_condensation_stages"))

        return np.asarray(_over_rows(one, traj.params))

    condensation = {
        describe(name).strip("'"): over_rows(row_condensation, name) for name in outer
    }
    rank = over_rows(effective_rank, key_query)
    ts = np.asarray(traj.ts)
    signals = {f"condensation_{n}": c for n, c in condensation.items()}
    key_query_name = describe(key_query).strip("'")
    signals[f"effective_rank_{key_query_name}"] = rank
    condensed = np.all([c > condensation_threshold for c in condensation.values()], 0)
    if not condensed.any():
        return Phases(
            None,
            None,
            ("condensation",) * len(ts),
            signals,
            ts,
            False,
            f"No stage boundary: the rows of {list(outer)} never condensed above "
            f"{condensation_threshold} by t = {ts[-1]:.4g}.",
        )
    i1 = int(np.argmax(condensed))
    i2 = i1 + int(np.argmin(rank[i1:]))
    labels = tuple(
        "condensation"
        if i <= i1
        else "rank collapse"
        if i <= i2
        else "further training"
        for i in range(len(ts))
    )
    return Phases(
        t1=float(ts[i1]),
        t2=float(ts[i2]),
        labels=labels,
        signals=signals,
        ts=ts,
        found=True,
        reason=(
            f"Condensed at t1 = {ts[i1]:.4g} (row condensation above "
            f"{condensation_threshold}); {key_query_name}'s effective rank falls from "
            f"{rank[0]:.3g} to {rank[i2]:.3g} at t2 = {ts[i2]:.4g} (rank collapse), "
            f"then ends at {rank[-1]:.3g}."
        ),
    )
