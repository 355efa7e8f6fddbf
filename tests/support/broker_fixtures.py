"""Fixtures for MQTT brokers: real mosquitto on free loopback ports.

- ``mosquitto``: a plain listener, anonymous clients allowed (retained messages, Last Will,
  sessions).
- ``mosquitto_tls``: the production mTLS template with fleet ACLs (see
  :mod:`tests.support.mosquitto` for the identities it issues).

Each test gets its own broker (starting one takes a few tens of milliseconds), stopped by
its PID afterwards. A missing mosquitto fails the test with the command that installs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.mosquitto import (
    Broker,
    TlsBroker,
    mosquitto_binary,
    plain_broker,
    tls_broker,
)


def _require_mosquitto() -> None:
    try:
        mosquitto_binary()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def mosquitto() -> Iterator[Broker]:
    """A running mosquitto on a free loopback port, anonymous access, no TLS."""
    _require_mosquitto()
    with plain_broker() as broker:
        yield broker


@pytest.fixture
def mosquitto_tls() -> Iterator[TlsBroker]:
    """A running mosquitto with the production mTLS configuration and fleet ACLs."""
    _require_mosquitto()
    with tls_broker() as broker:
        yield broker
