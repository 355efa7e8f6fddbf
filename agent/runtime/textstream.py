"""Token ids to text deltas: UTF-8 safe, stop sequences never emitted. Pure.

Invariants of :class:`TextStream`:

- the concatenation of every delta equals the decoded completion up to (excluding) the
  first stop sequence;
- no delta ends inside a UTF-8 character: the bytes of a character split over several
  tokens are held back until the character is complete;
- text that could still become a stop sequence is held back until it cannot; once a stop
  sequence appears, :attr:`stopped` is true and nothing more is emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def byte_level_table() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: printable character -> byte it stands for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TextStream:
    """Turns a growing list of token ids into text deltas.

    ``token_bytes[i]`` is the byte string of token ``i`` (empty for control tokens).
    """

    def __init__(self, token_bytes: Sequence[bytes], stop: Sequence[str] = ()) -> None:
        self._bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to emit (may be empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(self._bytes[token])
        return self._release()

    def flush(self) -> str:
        """End of generation: return whatever is still held back (never a stop sequence)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        self._check_stop()
        if self.stopped:
            return self._pending
        out, self._pending = self._pending, ""
        return out

    def _check_stop(self) -> None:
        cut = min((i for s in self._stop if (i := self._pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._pending = self._pending[:cut]
            self.stopped = True

    def _release(self) -> str:
        self._check_stop()
        if self.stopped:
            out, self._pending = self._pending, ""
            return out
        # Hold back the longest tail that is a proper prefix of some stop sequence.
        hold = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out
