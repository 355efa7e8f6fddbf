"""The narrow encoding of a device's SecAgg+ upload (pure; no flwr).

SecAgg+ (Flower's ``secaggplus_mod``) sends each masked array as int64, 8 bytes per adapter
value, although every value lies in ``[0, mod_range)``. The server sums the devices' arrays
with plain NumPy ``+`` and then reduces the sum mod ``mod_range`` (a bit mask for a power of
two), and later adds and subtracts int64 masks and reduces again.

Invariant: when ``mod_range`` is a power of two dividing ``2**k``, an unsigned array of
``k`` bits holds the same residues, and NumPy's wrap-around addition in that dtype is
addition mod ``2**k``, hence exact mod ``mod_range``. So the server sums the narrow arrays
to the same aggregate with no change: 2 bytes per value for ``mod_range <= 2**16``, 4 for
``mod_range <= 2**32``. Any other ``mod_range`` leaves the arrays as they are (int64).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.errors import TrainingInputError

__all__ = ["clip_update", "narrow_dtype", "narrow_masked"]

Array = np.ndarray[Any, Any]

_NARROW: tuple[tuple[int, type[np.unsignedinteger[Any]]], ...] = (
    (1 << 16, np.uint16),
    (1 << 32, np.uint32),
)


def narrow_dtype(mod_range: int) -> np.dtype[Any] | None:
    """The narrowest unsigned dtype of ``2**k`` values (k in 16, 32) that the power of two
    ``mod_range`` divides; ``None`` when there is none (not a power of two, or above 2**32)."""
    if mod_range < 2 or mod_range & (mod_range - 1):
        return None
    for size, dtype in _NARROW:
        if mod_range <= size:
            return np.dtype(dtype)
    return None


def narrow_masked(arrays: list[Array], mod_range: int) -> list[Array]:
    """``arrays`` (masked SecAgg+ values, each in ``[0, mod_range)``) in :func:`narrow_dtype`
    of ``mod_range``; unchanged when there is none.

    Raises:
        TrainingInputError: an array is not of integers, or holds a value outside
            ``[0, mod_range)`` (narrowing it would change the server's sum).
    """
    dtype = narrow_dtype(mod_range)
    if dtype is None:
        return arrays
    out: list[Array] = []
    for i, arr in enumerate(arrays):
        if arr.dtype.kind not in "iu":
            raise TrainingInputError(f"masked array {i} is {arr.dtype}, not integers")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= mod_range):
            raise TrainingInputError(
                f"masked array {i} holds values in [{int(arr.min())}, {int(arr.max())}], "
                f"outside [0, {mod_range}) of the run's SecAgg+ modulus"
            )
        out.append(arr.astype(dtype))
    return out


def clip_update(new: list[Array], sent: list[Array], norm: float) -> list[Array]:
    """``sent + (new - sent) * min(1, norm / ||new - sent||)``, float32: the update scaled
    onto the L2 ball of radius ``norm`` (client-level DP's sensitivity). An update already
    inside it, including one of exactly zero, is returned unchanged.

    Raises:
        TrainingInputError: the arrays do not pair up, or ``norm`` is not positive.
    """
    if not norm > 0:
        raise TrainingInputError(f"the round's clipping norm must be > 0, got {norm}")
    if len(new) != len(sent) or any(n.shape != s.shape for n, s in zip(new, sent, strict=False)):
        raise TrainingInputError("the update's arrays do not match the ones the round sent")
    deltas = [
        np.asarray(n, np.float64) - np.asarray(s, np.float64)
        for n, s in zip(new, sent, strict=True)
    ]
    size = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas)))
    scale = min(1.0, norm / size) if size > 0 else 1.0
    return [
        (np.asarray(s, np.float64) + d * scale).astype(np.float32)
        for s, d in zip(sent, deltas, strict=True)
    ]
