"""Checkpoints: a long run written to disk as it goes, resumed after a kill.

A run with `checkpoint=DIR` is cut into segments; after each, the whole state of
the run (for `simulate`, the engine's loop carry: solver and controller state,
saves so far, counters) is written to `DIR/checkpoint.npz` together with a
fingerprint of the call. The write is atomic (a temporary file, fsync, rename), so
the file on disk is always a complete checkpoint, whatever moment the process dies
at. A later call with the same arguments finds it and goes on from there: the same
compiled step, from the same state, gives the same steps bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ._compile import CompileTimer

FILE_NAME = "checkpoint.npz"
_FORMAT_VERSION = 1


def directory(path: str | os.PathLike) -> pathlib.Path:
    """The checkpoint directory, created if need be; refused if it is a file or
    cannot be written to."""
    try:
        folder = pathlib.Path(path)
    except TypeError:
        raise TypeError(
            f"`checkpoint` must be a directory path; got {type(path).__name__}."
        ) from None
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"`checkpoint` = {str(folder)!r} is a file; checkpoints go in a directory. "
            "Give a directory path (it is created if missing)."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".gflow-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"`checkpoint` = {str(folder)!r} cannot be written to ({e.strerror}): give "
            "a directory you can write to."
        ) from e
    return folder


def describe(model: Any, opts: Any, meta: dict, **extra: Any) -> dict:
    """What a fingerprint records of a call besides its arrays: its options
    (`meta`, `extra`) and the names of its loss, metrics and stopping rule. The code
    of user functions cannot be compared across processes; their names can."""
    loss = getattr(model, "loss", model)
    return dict(
        meta,
        **extra,
        loss=f"{getattr(loss, '__module__', '')}.{getattr(loss, '__qualname__', '')}",
        model=type(model).__qualname__,
        metrics=[name for name, _ in opts.metrics.fns],
        stop_when=getattr(opts.stopping, "when", None) is not None,
    )


def fingerprint(kind: str, meta: dict, *trees: Any) -> str:
    """A hash of everything that decides a run: what ran (`kind`), its options
    (`meta`, without run-dependent entries), and the structure, shapes, dtypes and
    bytes of `trees` (the initial parameters and the data)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([kind, meta], sort_keys=True, default=repr).encode())
    for tree in trees:
        leaves, treedef = jax.tree.flatten(tree)
        digest.update(str(treedef).encode())
        for leaf in leaves:
            array = np.asarray(leaf)
            digest.update(f"{array.shape}{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def write(folder: pathlib.Path, stamp: str, state: Any) -> None:
    """Write `state` (a pytree of arrays) atomically to `folder/checkpoint.npz`."""
    arrays = {f"leaf/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    header = {"format": _FORMAT_VERSION, "fingerprint": stamp}
    arrays["__gflow_checkpoint__"] = np.array(json.dumps(header))
    target = folder / FILE_NAME
    temporary = folder / f"{FILE_NAME}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, target)
    # The rename itself is made durable by syncing the directory.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(folder: pathlib.Path, stamp: str, like: Any) -> Any | None:
    """The state stored in `folder`, with the structure of `like`; None if there is
    no checkpoint yet. A checkpoint of another call, or a damaged one, is refused:
    nothing is resumed from a file that does not match exactly."""
    path = folder / FILE_NAME
    if not path.exists():
        return None
    start_over = f"delete {str(path)!r} to start over"
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["__gflow_checkpoint__"]))
            if header.get("fingerprint") != stamp:
                raise _Mismatch(
                    f"the checkpoint {str(path)!r} was written by a different call "
                    "(other options, initial parameters, data or gflow version). "
                    f"Use another checkpoint directory, or {start_over}."
                )
            expected, treedef = jax.tree.flatten(like)
            leaves = [npz[f"leaf/{i}"] for i in range(len(expected))]
            if len(npz.files) != len(expected) + 1:
                raise ValueError("it holds a different number of arrays")
    except _Mismatch as e:
        raise ValueError(str(e)) from None
    except (zipfile.BadZipFile, EOFError, KeyError, OSError, ValueError) as e:
        raise ValueError(
            f"the checkpoint {str(path)!r} is damaged or incomplete ({e}); "
            f"{start_over}."
        ) from e
    for leaf, want in zip(leaves, expected, strict=True):
        if leaf.shape != want.shape or leaf.dtype != want.dtype:
            raise ValueError(
                f"the checkpoint {str(path)!r} holds arrays of other shapes than this "
                f"run's state; {start_over}."
            )
    return jax.tree.unflatten(treedef, leaves)


def run_in_segments(
    fresh: Callable[[], Any],
    advance: Callable[[Any, int], Any],
    finished: Callable[[Any], bool],
    progress: Callable[[Any], int],
    folder: pathlib.Path,
    stamp: str,
    every_s: float,
    every_steps: int | None,
):
    """Run `advance(state, budget)` from the stored state (else `fresh()`) until
    `finished(state)`, writing a checkpoint after each segment.

    A segment's budget is `every_steps` (in the units of `progress`, which counts
    the work done: loop iterations, steps), or, by default, what takes about
    `every_s` seconds at the rate the previous segment ran. Returns the final
    state, the timer of the whole call (compiling apart from running) and the
    checkpoint's counters for `stats`.
    """
    with CompileTimer() as timer:
        state = fresh()
        stored = read(folder, stamp, state)
        state = state if stored is None else jax.device_put(stored)
        budget = every_steps or _FIRST_SEGMENT
        writes, write_s = 0, 0.0
        while not finished(state):
            before = progress(state)
            with CompileTimer() as segment:
                state = jax.block_until_ready(advance(state, budget))
            start = time.perf_counter()
            write(folder, stamp, state)
            write_s += time.perf_counter() - start
            writes += 1
            if every_steps is None:
                rate = (progress(state) - before) / max(segment.run_time_s, 1e-3)
                budget = int(np.clip(rate * every_s, 1, np.iinfo(np.int32).max))
    stats = dict(
        resumed=stored is not None,
        checkpoint_writes=writes,
        checkpoint_write_time_s=write_s,
    )
    return state, timer, stats


# The first segment of a timed run is short: it measures how fast the work goes.
_FIRST_SEGMENT = 50


class _Mismatch(Exception):
    pass
