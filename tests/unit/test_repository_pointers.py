"""Device pointers in the real repository: what a staged rollout signs wave by wave.

The repository is made with the release CLI (keys, ``release init``); the pointers are
moved through :class:`coordinator.repository.Repository` as the coordinator daemon does,
with the online channels key only.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from coordinator.errors import RefusedError
from coordinator.repository import ExpiryPolicy, KeyRing, Repository, env_passphrases
from coordinator.serve import REFRESH_EVERY_S, Coordinator
from coordinator.settings import CoordinatorSettings
from protocol.release import CHANNELS_ROLE, device_pointer_path
from tests.support.ota_fleet import PASSPHRASE, ReleaseRepo
from tests.support.repo_simulator import write_base_bundle

CHANNEL = "stable"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    release = ReleaseRepo(tmp_path)
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        write_base_bundle(tmp_path / version, version=version, seed=seed)
        release.cli(
            "release", "add-bundle", str(tmp_path / version),
            "--repo", str(release.path), "--keys", str(release.keys),
        )  # fmt: skip
    release.cli(
        "release", "point", "tiny", "1.0.0", "--group", "lab", "--channel", CHANNEL,
        "--repo", str(release.path), "--keys", str(release.keys),
    )  # fmt: skip
    keys = KeyRing([release.keys], env_passphrases({"NANOFLEET_KEY_PASSPHRASE": PASSPHRASE}))
    return Repository(release.path, keys)


def test_point_devices_lists_one_pointer_per_device_in_one_publish(repo: Repository) -> None:
    before = repo.timestamp().signed.version
    pointers = repo.point_devices(["kiosk-1", "kiosk-2"], CHANNEL, "tiny", "2.0.0")
    assert [p.device_id for p in pointers] == ["kiosk-1", "kiosk-2"]
    assert repo.timestamp().signed.version == before + 1
    # Each pointer sits in its hash bin, not in the channels role: a device downloads only
    # its own bin.
    path = device_pointer_path("kiosk-1", CHANNEL)
    assert path not in repo.targets(CHANNELS_ROLE).signed.targets
    assert path in repo.targets(bin_of(repo, path)).signed.targets
    assert sorted(p.device_id for p in repo.device_pointers()) == ["kiosk-1", "kiosk-2"]
    assert {p.base.version for p in repo.device_pointers()} == {"2.0.0"}
    # The group pointer is untouched: devices outside the wave keep 1.0.0.
    (group,) = repo.channels()
    assert (group.group, group.base.version) == ("lab", "1.0.0")


def bin_of(repo: Repository, path: str) -> str:
    delegations = repo.targets(CHANNELS_ROLE).signed.delegations
    assert delegations is not None
    assert delegations.succinct_roles is not None
    return delegations.succinct_roles.get_role_for_target(path)


def bin_versions(repo: Repository) -> dict[str, int]:
    meta = repo.snapshot().signed.meta
    return {k.removesuffix(".json"): v.version for k, v in meta.items() if k.startswith("devices-")}


def test_the_channels_role_delegates_device_pointers_to_64_signed_bins(repo: Repository) -> None:
    channels = repo.targets(CHANNELS_ROLE)
    before = bin_versions(repo)
    assert len(before) == 64
    devices = [f"kiosk-{i}" for i in range(40)]
    repo.point_devices(devices, CHANNEL, "tiny", "2.0.0")
    after = bin_versions(repo)
    touched = {bin_of(repo, device_pointer_path(d, CHANNEL)) for d in devices}
    assert {b for b in after if after[b] != before[b]} == touched  # only their bins change
    for name in touched:
        md = repo.targets(name)
        channels.verify_delegate(name, md)  # signed with the channels key
        assert all(bin_of(repo, path) == name for path in md.signed.targets)


def test_rotating_the_channels_key_re_signs_the_bins(repo: Repository) -> None:
    repo.point_devices(["kiosk-1"], CHANNEL, "tiny", "2.0.0")
    (new_key,) = repo.rotate(CHANNELS_ROLE)
    channels = repo.targets(CHANNELS_ROLE)
    name = bin_of(repo, device_pointer_path("kiosk-1", CHANNEL))
    assert channels.signed.delegations is not None
    assert channels.signed.delegations.succinct_roles is not None
    assert channels.signed.delegations.succinct_roles.keyids == [new_key]
    channels.verify_delegate(name, repo.targets(name))
    repo.point_devices(["kiosk-2"], CHANNEL, "tiny", "2.0.0")  # the new key signs on
    other = bin_of(repo, device_pointer_path("kiosk-2", CHANNEL))
    channels.verify_delegate(other, repo.targets(other))


def test_pointing_again_at_the_same_release_publishes_nothing(repo: Repository) -> None:
    repo.point_devices(["kiosk-1"], CHANNEL, "tiny", "2.0.0")
    version = repo.timestamp().signed.version
    repo.point_devices(["kiosk-1"], CHANNEL, "tiny", "2.0.0")
    assert repo.timestamp().signed.version == version


def test_clear_devices_removes_only_the_named_pointers(repo: Repository) -> None:
    repo.point_devices(["kiosk-1", "kiosk-2"], CHANNEL, "tiny", "2.0.0")
    assert repo.clear_devices(["kiosk-1", "kiosk-9"], CHANNEL) == ["kiosk-1"]
    assert [p.device_id for p in repo.device_pointers()] == ["kiosk-2"]
    version = repo.timestamp().signed.version
    assert repo.clear_devices(["kiosk-1"], CHANNEL) == []
    assert repo.timestamp().signed.version == version


@pytest.mark.parametrize(
    ("devices", "channel", "version", "message"),
    [
        (["kiosk-1"], CHANNEL, "9.9.9", "tiny 9.9.9 is not published"),
        (["bad/id"], CHANNEL, "2.0.0", "device 'bad/id'"),
        (["kiosk-1"], "no channel", "2.0.0", "channel 'no channel'"),
    ],
)
def test_bad_pointers_are_refused_and_nothing_is_published(
    repo: Repository, devices: list[str], channel: str, version: str, message: str
) -> None:
    before = repo.timestamp().signed.version
    with pytest.raises(RefusedError, match=message):
        repo.point_devices(devices, channel, "tiny", version)
    assert repo.timestamp().signed.version == before
    assert repo.device_pointers() == []


def test_writers_of_one_repository_take_turns(repo: Repository) -> None:
    """A second writer (another process in production) waits for the lock holder."""
    other = Repository(repo.path, repo.keys)
    done = threading.Event()

    def write() -> None:
        other.point_devices(["kiosk-2"], CHANNEL, "tiny", "2.0.0")
        done.set()

    with repo._lock():
        repo.point_devices(["kiosk-1"], CHANNEL, "tiny", "2.0.0")  # re-entrant for the holder
        writer = threading.Thread(target=write)
        writer.start()
        assert not done.wait(0.3)
        held_version = repo.timestamp().signed.version
    writer.join(10)
    assert done.is_set()
    assert repo.timestamp().signed.version == held_version + 1
    assert sorted(p.device_id for p in repo.device_pointers()) == ["kiosk-1", "kiosk-2"]


def test_the_coordinator_re_signs_online_metadata_before_it_expires(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Devices refuse expired metadata; ``nanofleet serve`` keeps the timestamp fresh."""
    short = Repository(repo.path, repo.keys, expiry=ExpiryPolicy(timestamp=timedelta(minutes=5)))
    short.refresh(force=True)
    expires = repo.timestamp().signed.expires
    monkeypatch.setenv("NANOFLEET_KEY_PASSPHRASE", PASSPHRASE)
    settings = CoordinatorSettings(
        database_url=f"sqlite:///{tmp_path / 'registry.sqlite3'}",
        api_token="refresh-test-token-0123456789",
        repository_path=repo.path,
        keys=tmp_path / "keys",  # where ReleaseRepo made them
    )
    coordinator = Coordinator(settings)
    try:
        signed = coordinator.refresh_repository(now=1000.0)
        assert "timestamp" in signed
        assert repo.timestamp().signed.expires - expires > timedelta(hours=12)
        assert coordinator.refresh_repository(now=1000.0 + REFRESH_EVERY_S / 2) == []
    finally:
        coordinator.registry.engine.dispose()
