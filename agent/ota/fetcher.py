"""The HTTP fetcher the TUF client and the blob store download through.

python-tuf's default fetcher has no minimum rate, no overall deadline and leaks urllib3's
exceptions on a cut connection. This one:

- raises only tuf's download errors: :class:`~tuf.api.exceptions.DownloadHTTPError` for an
  HTTP error status, :class:`~tuf.api.exceptions.SlowRetrievalError` when the average rate
  stays below :attr:`FetchLimits.min_rate_bytes_per_s` after a grace period, when no byte
  arrives for :attr:`FetchLimits.read_timeout_s` or when the overall deadline passes,
  :class:`~tuf.api.exceptions.DownloadLengthMismatchError` when a response announces more
  than :attr:`FetchLimits.max_response_bytes`, and :class:`~tuf.api.exceptions.DownloadError`
  for everything else;
- resumes a cut transfer with an HTTP ``Range`` request (at most
  :attr:`FetchLimits.max_resumes` times), accepting only a ``206`` whose ``Content-Range``
  starts where the transfer stopped and names the same total length;
- can start at an offset (:meth:`HttpFetcher.stream`), so the store can resume a partial
  file left by an earlier attempt.

It checks no content: lengths and hashes are checked by whoever consumes the bytes against
signed metadata (tuf for metadata, :mod:`agent.ota.store` for targets).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class FetchLimits:
    """Bounds of one download. Rates in bytes per second, times in seconds."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 15.0
    """Longest wait for any byte; a longer stall counts as slow retrieval."""
    min_rate_bytes_per_s: float = 16 * 1024
    """Lowest average rate tolerated once ``rate_grace_s`` has passed."""
    rate_grace_s: float = 10.0
    deadline_s: float = 3600.0
    """Longest a single download (all resumes included) may take."""
    max_resumes: int = 5
    max_response_bytes: int = 8 * 1024**3
    """Largest body a response may announce."""
    chunk_bytes: int = 1024 * 1024
    """Most bytes taken from the connection at a time (fewer, larger pieces for the store to
    hash and write: 64 KiB pieces made a 119 MB install ~1.5x slower). A slow server still
    yields whatever arrived, so the rate watchdog sees every piece."""

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "read_timeout_s", "deadline_s", "chunk_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FetchLimits.{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_rate_bytes_per_s", "rate_grace_s", "max_resumes"):
            if getattr(self, name) < 0:
                raise ValueError(f"FetchLimits.{name} must be >= 0, got {getattr(self, name)}")


class _Transfer:
    """Rate and deadline bookkeeping of one :meth:`HttpFetcher.stream` call."""

    def __init__(self, url: str, limits: FetchLimits, clock: Callable[[], float]) -> None:
        self.url = url
        self.limits = limits
        self.clock = clock
        self.started = clock()
        self.received = 0

    def remaining_s(self) -> float:
        left = self.limits.deadline_s - (self.clock() - self.started)
        if left <= 0:
            raise exceptions.SlowRetrievalError(
                f"{self.url}: not complete after the deadline of {self.limits.deadline_s:g} s"
            )
        return left

    def add(self, n: int) -> None:
        self.received += n
        elapsed = self.clock() - self.started
        if elapsed <= self.limits.rate_grace_s:
            return
        rate = self.received / elapsed
        if rate < self.limits.min_rate_bytes_per_s:
            raise exceptions.SlowRetrievalError(
                f"{self.url}: average rate {rate:.0f} B/s over {elapsed:.1f} s is below the "
                f"minimum of {self.limits.min_rate_bytes_per_s:.0f} B/s"
            )


class HttpFetcher(FetcherInterface):
    """A :class:`~tuf.ngclient.fetcher.FetcherInterface` over urllib3 with the bounds above.

    ``clock`` (monotonic seconds) is injectable for tests. One instance may serve many
    downloads, sequentially or from several threads (urllib3's pool is thread-safe).
    """

    def __init__(
        self,
        limits: FetchLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        user_agent: str = "nanofleet-agent",
    ) -> None:
        self.limits = limits or FetchLimits()
        self._clock = clock
        self._pool = urllib3.PoolManager(
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
            retries=False,
        )

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.stream(url)

    def stream(self, url: str, start: int = 0) -> Iterator[bytes]:
        """Yield the bytes of ``url`` from offset ``start`` on, resuming after cuts.

        Raises (while iterating): the tuf download errors listed in the module docstring.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        return self._stream(url, start)

    def _stream(self, url: str, start: int) -> Iterator[bytes]:
        transfer = _Transfer(url, self.limits, self._clock)
        offset = start
        total: int | None = None
        resumes = 0
        while True:
            response = self._request(url, offset, transfer)
            complete = False
            try:
                skip, total = self._check_response(url, response, offset, total)
                try:
                    yield from self._body(response, skip, transfer)
                except (urllib3.exceptions.ProtocolError, urllib3.exceptions.SSLError) as e:
                    if resumes >= self.limits.max_resumes:
                        raise exceptions.DownloadError(
                            f"{url}: connection cut {resumes + 1} times, over the limit of "
                            f"{self.limits.max_resumes} resumes"
                        ) from e
                    resumes += 1
                    offset = start + transfer.received
                    continue
                if total is not None and start + transfer.received != total:
                    raise exceptions.DownloadError(
                        f"{url}: body ended at byte {start + transfer.received} of {total}"
                    )
                complete = True
                return
            finally:
                if not complete:
                    # Unread bytes (an error page, a refused or abandoned body) would be
                    # taken as the next response on a reused connection: close it instead.
                    response.close()
                response.release_conn()

    def _request(self, url: str, offset: int, transfer: _Transfer) -> urllib3.BaseHTTPResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        timeout = urllib3.Timeout(
            connect=min(self.limits.connect_timeout_s, transfer.remaining_s()),
            read=min(self.limits.read_timeout_s, transfer.remaining_s()),
        )
        try:
            return self._pool.request(
                "GET",
                url,
                headers=headers,
                preload_content=False,
                decode_content=False,
                redirect=False,
                timeout=timeout,
            )
        except urllib3.exceptions.ReadTimeoutError as e:
            raise exceptions.SlowRetrievalError(f"{url}: no response headers in time") from e
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"{url}: request failed: {e}") from e

    def _check_response(
        self, url: str, response: urllib3.BaseHTTPResponse, offset: int, total: int | None
    ) -> tuple[int, int | None]:
        """Return (bytes to skip at the start of the body, total length if known)."""
        status = response.status
        if status >= 400:
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {status}", status)
        length_header = response.headers.get("Content-Length")
        body_length = int(length_header) if length_header and length_header.isdigit() else None
        if body_length is not None and body_length > self.limits.max_response_bytes:
            raise exceptions.DownloadLengthMismatchError(
                f"{url}: response announces {body_length} bytes, over the limit of "
                f"{self.limits.max_response_bytes}"
            )
        if status == 200:
            # A server that ignores Range sends the whole body: skip what we already have.
            new_total = body_length
            skip = offset
        elif status == 206 and offset:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                raise exceptions.DownloadError(
                    f"{url}: asked for bytes from {offset}, got Content-Range "
                    f"{response.headers.get('Content-Range')!r}"
                )
            new_total = None if match.group(3) == "*" else int(match.group(3))
            skip = 0
        else:
            raise exceptions.DownloadHTTPError(f"{url}: unexpected HTTP {status}", status)
        if total is not None and new_total is not None and new_total != total:
            raise exceptions.DownloadError(
                f"{url}: the file changed during the download ({total} -> {new_total} bytes)"
            )
        return skip, new_total if new_total is not None else total

    def _body(
        self, response: urllib3.BaseHTTPResponse, skip: int, transfer: _Transfer
    ) -> Iterator[bytes]:
        chunk_bytes = self.limits.chunk_bytes
        while True:
            transfer.remaining_s()
            try:
                chunk = response.read1(chunk_bytes)
            except urllib3.exceptions.ReadTimeoutError as e:
                raise exceptions.SlowRetrievalError(
                    f"{transfer.url}: no data for {self.limits.read_timeout_s:g} s"
                ) from e
            if not chunk:
                return
            if skip:
                dropped = min(skip, len(chunk))
                skip -= dropped
                chunk = chunk[dropped:]
                if not chunk:
                    continue
            transfer.add(len(chunk))
            yield chunk
