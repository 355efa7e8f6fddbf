"""The OTA fetcher against a real loopback HTTP server: Range resume, rate, deadline, limits."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from tuf.api import exceptions

from agent.ota.fetcher import FetchLimits, HttpFetcher
from tests.support.repo_simulator import RepoHTTPServer

BODY = random.Random(3).randbytes(300_000)


@pytest.fixture
def server() -> Iterator[RepoHTTPServer]:
    files = {"blob": BODY, "small": b"0123456789"}
    with RepoHTTPServer(files.get) as srv:
        yield srv


def fetch_all(fetcher: HttpFetcher, url: str, start: int = 0) -> bytes:
    return b"".join(fetcher.stream(url, start))


def test_a_whole_file_arrives_in_one_request(server: RepoHTTPServer) -> None:
    assert fetch_all(HttpFetcher(), f"{server.url}/blob") == BODY
    assert [(r.range, r.status) for r in server.requests] == [(None, 200)]


def test_a_cut_connection_is_resumed_with_a_range_request(server: RepoHTTPServer) -> None:
    server.faults.cut_after["blob"] = 100_000
    assert fetch_all(HttpFetcher(), f"{server.url}/blob") == BODY
    assert [(r.range, r.status) for r in server.requests] == [
        (None, 200),
        ("bytes=100000-", 206),
    ]


def test_a_download_can_start_at_an_offset(server: RepoHTTPServer) -> None:
    assert fetch_all(HttpFetcher(), f"{server.url}/blob", 250_000) == BODY[250_000:]
    assert server.requests[0].range == "bytes=250000-"


def test_a_server_ignoring_range_still_yields_the_right_bytes(server: RepoHTTPServer) -> None:
    server.faults.ignore_range = True
    assert fetch_all(HttpFetcher(), f"{server.url}/blob", 1000) == BODY[1000:]
    assert server.requests[0].status == 200


def test_a_content_range_that_starts_elsewhere_is_refused(server: RepoHTTPServer) -> None:
    server.faults.wrong_content_range = True
    with pytest.raises(exceptions.DownloadError, match="Content-Range"):
        fetch_all(HttpFetcher(), f"{server.url}/blob", 10)


def test_resumes_are_bounded(server: RepoHTTPServer) -> None:
    server.faults.cut_after["blob"] = 1000
    fetcher = HttpFetcher(FetchLimits(max_resumes=0))
    with pytest.raises(exceptions.DownloadError, match="over the limit of 0 resumes"):
        fetch_all(fetcher, f"{server.url}/blob")


def test_a_slow_server_is_abandoned_below_the_minimum_rate(server: RepoHTTPServer) -> None:
    server.faults.throttle_bytes_per_s = 20_000
    fetcher = HttpFetcher(FetchLimits(min_rate_bytes_per_s=200_000, rate_grace_s=0.2))
    with pytest.raises(exceptions.SlowRetrievalError, match="below the minimum"):
        fetch_all(fetcher, f"{server.url}/blob")
    assert server.sent_to("blob") < len(BODY) // 2


def test_a_stalled_server_trips_the_read_timeout(server: RepoHTTPServer) -> None:
    server.faults.throttle_bytes_per_s = 2  # one byte every half second
    fetcher = HttpFetcher(FetchLimits(read_timeout_s=0.1, min_rate_bytes_per_s=0))
    with pytest.raises(exceptions.SlowRetrievalError, match="no data for"):
        fetch_all(fetcher, f"{server.url}/blob")


def test_the_overall_deadline_holds_even_at_an_acceptable_rate(server: RepoHTTPServer) -> None:
    server.faults.throttle_bytes_per_s = 400_000
    clock_values = iter([0.0] + [0.5 * i for i in range(1, 1000)])
    fetcher = HttpFetcher(
        FetchLimits(deadline_s=2.0, min_rate_bytes_per_s=0), clock=lambda: next(clock_values)
    )
    with pytest.raises(exceptions.SlowRetrievalError, match="deadline"):
        fetch_all(fetcher, f"{server.url}/blob")


def test_http_errors_carry_their_status(server: RepoHTTPServer) -> None:
    with pytest.raises(exceptions.DownloadHTTPError) as err:
        fetch_all(HttpFetcher(), f"{server.url}/missing")
    assert err.value.status_code == 404


def test_a_response_announcing_too_much_is_refused_before_reading(
    server: RepoHTTPServer,
) -> None:
    fetcher = HttpFetcher(FetchLimits(max_response_bytes=1000))
    with pytest.raises(exceptions.DownloadLengthMismatchError, match="over the limit of 1000"):
        fetch_all(fetcher, f"{server.url}/blob")


def test_tuf_length_limits_apply_through_the_fetcher(server: RepoHTTPServer) -> None:
    with pytest.raises(exceptions.DownloadLengthMismatchError):
        HttpFetcher().download_bytes(f"{server.url}/small", 5)
    assert HttpFetcher().download_bytes(f"{server.url}/small", 10) == b"0123456789"


def test_an_unreachable_server_is_a_download_error() -> None:
    with pytest.raises(exceptions.DownloadError):
        fetch_all(HttpFetcher(FetchLimits(connect_timeout_s=1)), "http://127.0.0.1:9/x")


@pytest.mark.parametrize(
    ("field", "value"),
    [("read_timeout_s", 0), ("deadline_s", -1), ("chunk_bytes", 0), ("max_resumes", -1)],
)
def test_limits_are_validated(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        FetchLimits(**{field: value})


def test_large_reads_still_hand_over_each_piece_as_it_arrives(server: RepoHTTPServer) -> None:
    # Reads are large (few, big pieces for the store to hash and write), but a read never
    # waits to fill its buffer: a trickling server's pieces reach the rate watchdog at once.
    assert FetchLimits().chunk_bytes >= 1024 * 1024
    server.faults.throttle_bytes_per_s = 200_000  # 10,000-byte pieces over 1.5 s
    pieces = [len(c) for c in HttpFetcher().stream(f"{server.url}/blob")]
    assert sum(pieces) == len(BODY)
    assert len(pieces) >= 2  # a read that waited to fill 1 MiB would yield the body whole
