"""Schemathesis against the real daemon: its own ``/openapi.json``, a real Unix socket.

Every operation the document lists gets generated requests, valid and invalid (a bounded,
derandomized run: the same requests on every run). Each response must not be a server
error (5xx) and must conform to the document: a status code it lists, its content type, its
headers and its body schema. The daemon serves the tiny test model with
``max_tokens_max = 8``, so a generation costs a few milliseconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.processes import ManagedProcess, notified

AGENT = [os.fspath(Path(os.sys.executable).parent / "nanofleet-agent"), "run"]
BASE_URL = "http://agent"
REPO = Path(__file__).resolve().parents[2]
#: Generated requests per operation and phase (fuzzing); the whole run stays well under 60 s.
MAX_EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def daemon_socket(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("schemathesis")
    sock = work / "agent.sock"
    config = work / "agent.toml"
    config.write_text(
        f'[model]\ndir = "{tiny_model_dir}"\n[server]\nsocket_path = "{sock}"\n'
        "[server.limits]\nmax_tokens_max = 8\n",
        "utf-8",
    )
    with ManagedProcess([*AGENT, "--config", config], notify=True, name="agent-st") as proc:
        proc.wait_ready(notified("READY=1"), timeout=60)
        yield sock


@pytest.fixture(scope="module")
def http(daemon_socket: Path) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=os.fspath(daemon_socket))
    with httpx.Client(transport=transport, base_url=BASE_URL, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def served_schema(http: httpx.Client) -> Any:
    response = http.get("/openapi.json")
    response.raise_for_status()
    schema = schemathesis.openapi.from_dict(response.json())
    schema.config.update(base_url=BASE_URL)
    return schema


def send(http: httpx.Client, case: Any) -> httpx.Response:
    """Send what schemathesis generated over the Unix socket."""
    kwargs = case.as_transport_kwargs(base_url=BASE_URL)
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        body["content"] = kwargs["data"]
    return http.request(
        kwargs["method"],
        kwargs["url"],
        headers=kwargs.get("headers"),
        params=kwargs.get("params"),
        **body,
    )


def _committed_cases() -> list[tuple[str, GenerationMode]]:
    """(operation, mode) pairs of the committed document (test_openapi_doc keeps it equal to
    the served one), so each gets its own test id at collection time. Invalid requests are
    generated only for operations that take input: a bare GET has no invalid form."""
    document = json.loads((REPO / "docs" / "openapi.json").read_text("utf-8"))
    cases = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            label = f"{method.upper()} {path}"
            cases.append((label, GenerationMode.POSITIVE))
            if "requestBody" in operation or operation.get("parameters"):
                cases.append((label, GenerationMode.NEGATIVE))
    return cases


def _operation(schema: Any, label: str) -> Any:
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label == label:
            return operation
    raise AssertionError(f"{label} is in docs/openapi.json but not in the served document")


# schemathesis's pytest plugin does not load under pytest 9; hypothesis drives the cases here.
@pytest.mark.parametrize(("label", "mode"), _committed_cases())
def test_every_operation_conforms_and_never_answers_5xx(
    label: str, mode: GenerationMode, served_schema: Any, http: httpx.Client
) -> None:
    operation = _operation(served_schema, label)
    sent: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: Any) -> None:
        response = send(http, case)
        sent.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    check()
    assert sent, f"no request was generated for {label}"
