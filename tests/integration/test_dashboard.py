"""The dashboard served by `nanofleet serve` (a real process), in headless Chromium
(Debian's package, driven by Playwright): sign-in with the operator token, the fleet page
with each device's judged state, a rollout page with its waves and progress, a round page
with its plot, and a device's update history. Screenshots go to ``out/dashboard/``
(gitignored) for a human to look at.

The registry is filled through its own seams (ingest, the liveness sweep, policy steps,
round metrics) on a manual clock, so every state on the page is known in advance.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from coordinator.registry import (
    LinkState,
    LivenessRule,
    Registry,
    RolloutSpec,
    Selector,
    open_registry,
)
from coordinator.rollout.policy import WaveSize, WaveSpec, decide
from coordinator.web.dashboard import REFRESH_S
from protocol.bundle import bundle_hash
from protocol.messages import (
    BundleRef,
    DeviceStatus,
    Health,
    Heartbeat,
    UpdateProgress,
    UpdateState,
)
from tests.support.db_fixtures import ManualClock, make_manifest, make_round_manifest
from tests.support.processes import ManagedProcess, free_port, log_contains

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
TOKEN = "dashboard-test-token-0123456789"
NANOFLEET = [sys.executable, "-c", "from coordinator.cli import main; main()"]
SHOTS = Path(__file__).resolve().parents[2] / "out" / "dashboard"
#: device -> the state the fleet page must show.
EXPECTED = {
    "edge-01": "online",
    "edge-02": "online",
    "edge-03": "offline",
    "edge-04": "offline",
    "edge-05": "unknown",
}
LOSSES = [2.9, 2.4, 2.1, 1.95, 1.9]


def _beat(reg: Registry, device: str, clock: ManualClock, sha: str) -> None:
    now = clock()
    ref = BundleRef(name="nano", version="1.0.0", sha256=sha)
    status = DeviceStatus(
        agent_version="0.1.0",
        health=Health.HEALTHY,
        base=ref,
        slot="a",
        uptime_s=100,
        load_1m=0.2,
        free_disk_bytes=10**9,
        reported_at=now,
    )
    beat = Heartbeat(
        sent_at=now,
        health=Health.HEALTHY,
        base_sha256=sha,
        uptime_s=100,
        load_1m=0.2,
        free_disk_bytes=10**9,
    )
    reg.ingest([(device, status, now), (device, beat, now)])


@dataclass(frozen=True)
class Served:
    """`nanofleet serve` on a registry with a known fleet, rollout and round."""

    base_url: str
    first_wave: tuple[str, ...]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    # Recent times, so the daemon's own clock finds no wave timed out while the test runs;
    # without [mqtt] it sweeps no liveness, so the judged states below stay as they are.
    clock = ManualClock(datetime.now(UTC) - timedelta(minutes=10))
    url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    reg = open_registry(url, clock=clock)
    link_up = clock()
    base = make_manifest("nano", "1.0.0")
    base_sha = bundle_hash(base)
    for device in ("edge-01", "edge-02", "edge-03", "edge-04"):
        reg.register_device(device, groups=["edge"], actor="test")
        _beat(reg, device, clock, base_sha)
    clock.advance(200)
    reg.register_device("edge-05", groups=["edge"], actor="test")
    for device in ("edge-01", "edge-02"):
        _beat(reg, device, clock, base_sha)
    reg.sweep_liveness(LinkState(link_up, clock()), LivenessRule(interval_s=30, missed=3))

    release = reg.create_release(make_manifest("nano", "1.1.0"), actor="test")
    spec = RolloutSpec(
        release_id=release.id,
        selector=Selector(groups=("edge",)),
        waves=(WaveSpec(WaveSize.parse("2")), WaveSpec(WaveSize.parse("100%"))),
    )
    rollout = reg.create_rollout(spec, actor="test")
    first_wave = reg.step(rollout.id, decide)[0]
    target = BundleRef(name="nano", version="1.1.0", sha256=release.bundle_sha256)
    devices = getattr(first_wave, "devices", ())
    at = clock.advance(5)
    reg.ingest(
        [
            (
                d,
                UpdateProgress(
                    state=UpdateState.COMMITTED,
                    target=target,
                    timestamp_version=2,
                    bytes_done=10,
                    bytes_total=10,
                    at=at,
                ),
                at,
            )
            for d in devices
        ]
    )
    reg.step(rollout.id, decide)  # pass wave 1
    reg.step(rollout.id, decide)  # start wave 2

    reg.create_round(make_round_manifest("run-7", "edge"), actor="test")
    for number, loss in enumerate(LOSSES, start=1):
        reg.record_round_metric(
            "run-7", number, participants=3 + number % 2, loss=loss, perplexity=2.718**loss
        )
    reg.engine.dispose()
    port = free_port()
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'database_url = "{url}"\napi_token = "{TOKEN}"\nport = {port}\n'
        f'repository_path = "{tmp_path / "repo"}"\nrollout_interval_s = 0.2\n'
    )
    with ManagedProcess([*NANOFLEET, "serve", "-c", config], cwd=tmp_path) as proc:
        proc.wait_ready(log_contains("listening on"), timeout=60)
        yield Served(f"http://127.0.0.1:{port}", tuple(devices))


def test_dashboard_in_headless_chromium(served: Served) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: scripts/bootstrap.sh installs it")
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    wave1, base_url = served.first_wave, served.base_url
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(f"{base_url}/ui/")
            assert page.url.endswith("/ui/login"), page.url
            assert page.locator("meta[http-equiv=refresh]").count() == 0  # keeps typed input
            page.fill("#token", "wrong-token")
            page.click("button[type=submit]")
            assert "That token is not right" in page.content()
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("#devices")
            # Pages reload themselves, so a rollout or a round can be watched.
            refresh = page.locator("meta[http-equiv=refresh]").get_attribute("content")
            assert refresh == str(REFRESH_S)

            # The fleet: every device with its judged state.
            rows = page.locator("#devices tbody tr")
            assert rows.count() == len(EXPECTED)
            shown = {
                rows.nth(i).locator("td").nth(0).inner_text(): rows.nth(i)
                .locator("td")
                .nth(2)
                .inner_text()
                for i in range(rows.count())
            }
            assert shown == EXPECTED
            assert page.locator("#count-online b").inner_text() == "2"
            assert page.locator("#count-offline b").inner_text() == "2"
            assert "nano 1.0.0" in rows.nth(0).inner_text()
            page.screenshot(path=str(SHOTS / "fleet.png"), full_page=True)

            # A rollout: its two waves, the first passed, the second running.
            page.click("text=Rollouts")
            page.click("text=#1")
            waves = page.locator("#waves tbody tr")
            assert waves.count() == 2
            assert "passed" in waves.nth(0).inner_text()
            assert "2/2 committed" in waves.nth(0).inner_text()
            assert "running" in waves.nth(1).inner_text()
            assert "0/3 committed" in waves.nth(1).inner_text()
            assert page.locator("#decisions tbody tr").count() == 4
            page.screenshot(path=str(SHOTS / "rollout.png"), full_page=True)

            # A round: the plot has one point per round on both lines, and a bar each.
            page.goto(f"{base_url}/ui/rounds")
            page.click("text=run-7")
            plot = page.locator("#round-plot")
            assert plot.is_visible()
            points = plot.locator("polyline.loss").get_attribute("points") or ""
            assert len(points.split()) == len(LOSSES)
            assert plot.locator("polyline.perplexity").count() == 1
            assert plot.locator("rect.participation").count() == len(LOSSES)
            assert page.locator("#metrics tbody tr").count() == len(LOSSES)
            page.screenshot(path=str(SHOTS / "round.png"), full_page=True)

            # A device's update history.
            page.goto(f"{base_url}/ui/devices/{wave1[0]}")
            history = page.locator("#history tbody tr")
            assert history.count() == 1
            assert "nano 1.1.0" in history.nth(0).inner_text()
            assert "committed" in history.nth(0).inner_text()
            page.screenshot(path=str(SHOTS / "device.png"), full_page=True)
        finally:
            browser.close()
    for name in ("fleet", "rollout", "round", "device"):
        assert (SHOTS / f"{name}.png").stat().st_size > 0


def test_dashboard_needs_the_token(served: Served) -> None:
    with httpx.Client(base_url=served.base_url) as c:
        for path in ("/ui/", "/ui/rollouts/1", "/ui/rounds/run-7", "/ui/devices/edge-01"):
            response = c.get(path, follow_redirects=False)
            assert response.status_code == 303, path
            assert response.headers["location"] == "/ui/login"
        assert "edge-05" in c.get("/ui/", headers={"Authorization": f"Bearer {TOKEN}"}).text
        c.cookies.set("nanofleet_token", "not-the-token")
        assert c.get("/ui/", follow_redirects=False).status_code == 303
        c.cookies.set("nanofleet_token", TOKEN)
        assert "edge-05" in c.get("/ui/").text
