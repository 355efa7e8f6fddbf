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

__all__ = ["narrow_dtype", "narrow_masked"]

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
