"""The coordinator as the demo's operator uses it: the operator API (``/api/v1``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn
from rich.table import Table

from coordinator.errors import CoordinatorError

#: Update states that end a device's update without the release.
ENDED = ("failed", "rolled_back")


class Api:
    """The coordinator's operator API (``/api/v1``) with the operator token."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self._client = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0
        )

    def get(self, path: str) -> dict[str, Any]:
        r = self._client.get(f"/api/v1{path}")
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self._client.post(f"/api/v1{path}", json=body)
        if r.status_code >= 400:
            raise CoordinatorError(f"POST {path}: {r.status_code} {r.text[:300]}")
        data: dict[str, Any] = r.json()
        return data

    def page(self, path: str) -> int:
        """The status code of a dashboard page (``/ui{path}``) fetched with the token."""
        try:
            return self._client.get(f"/ui{path}").status_code
        except httpx.HTTPError:
            return 0

    def healthy(self) -> bool:
        try:
            r = self._client.get("/healthz")
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json().get("mqtt") == "connected"

    def close(self) -> None:
        self._client.close()


def follow_rollout(
    console: Console,
    updates: Callable[[], list[dict[str, Any]]],
    agents: int,
    wait: Callable[[Callable[[], bool], str, float], None],
    timeout_s: float,
) -> None:
    """Show each device's state and bytes (from ``updates()``) until all have committed;
    ``wait(cond, what, timeout_s)`` does the waiting.

    Raises:
        CoordinatorError: a device failed or rolled back, or time ran out.
    """
    with Progress(
        TextColumn("   {task.description}"),
        BarColumn(),
        DownloadColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def done() -> bool:
            rows = updates()
            for u in rows:
                device = u["device_id"]
                if device not in tasks:
                    tasks[device] = bar.add_task(device, total=None)
                bar.update(
                    tasks[device],
                    description=f"{device}: {u['state']:<11}",
                    completed=u["bytes_done"],
                    total=u["bytes_total"] or None,
                )
                if u["state"] in ENDED:
                    raise CoordinatorError(
                        f"{device} reported {u['state']}: {u.get('error_message')}"
                    )
            return len(rows) == agents and all(u["state"] == "committed" for u in rows)

        wait(done, "every device to commit the release", timeout_s)


def summary(api: Api, updates: list[dict[str, Any]], adapter_size: int, base_size: int) -> Table:
    """The fleet as the coordinator's API shows it, with each device's update (fits 80
    columns: bundles are named by the first 8 hex digits of their hash, listed below)."""
    by_device = {u["device_id"]: u for u in updates}
    devices: list[dict[str, Any]] = api.get("/devices")["devices"]
    bundles: dict[str, str] = {}
    table = Table(title="the fleet (GET /api/v1/devices)")
    for col in ("device", "state", "base", "adapter", "update", "downloaded"):
        table.add_column(col, no_wrap=True)
    for d in devices:
        u = by_device.get(d["id"], {})
        row = [d["id"], f"{d['online']}/{d.get('health')}"]
        for kind in ("base", "adapter"):
            bundle = d.get(kind)
            if bundle:
                bundles[bundle["sha256"][:8]] = f"{bundle['name']} {bundle['version']}"
            row.append(bundle["sha256"][:8] if bundle else "-")
        row += [str(u.get("state", "-")), f"{u.get('bytes_done', 0):,} B"]
        table.add_row(*row)
    table.caption = "; ".join(f"{h} = {name}" for h, name in bundles.items()) + (
        f"\nbundle sizes: adapter {adapter_size:,} B, base model {base_size:,} B"
    )
    return table
