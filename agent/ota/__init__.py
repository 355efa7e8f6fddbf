"""The OTA client: verified fetch, content-addressed store, A/B slots and the update lifecycle.

- :mod:`agent.ota.client`: the TUF client (one ``Updater`` per check) and target download;
- :mod:`agent.ota.fetcher`: HTTP with a minimum rate, a deadline and Range resume;
- :mod:`agent.ota.store`: blobs named by sha256, written once, never through a link;
- :mod:`agent.ota.slots`: two slots of hard links and the committed-slot pointer;
- :mod:`agent.ota.lifecycle`: the pure state machine and its crash-resume rules;
- :mod:`agent.ota.runner`: the runner that executes its actions against a controller.
"""

from agent.ota.client import Installed, RepositoryClient
from agent.ota.fetcher import FetchLimits, HttpFetcher
from agent.ota.lifecycle import Phase, Policy, UpdateRecord
from agent.ota.plan import ReleasePlan
from agent.ota.runner import (
    Activator,
    Controller,
    DeviceController,
    Outcome,
    RecordStore,
    UpdateRunner,
    jittered_backoff,
)
from agent.ota.slots import InstalledRelease, SlotManager
from agent.ota.store import BlobStore

__all__ = [
    "Activator",
    "BlobStore",
    "Controller",
    "DeviceController",
    "FetchLimits",
    "HttpFetcher",
    "Installed",
    "InstalledRelease",
    "Outcome",
    "Phase",
    "Policy",
    "RecordStore",
    "ReleasePlan",
    "RepositoryClient",
    "SlotManager",
    "UpdateRecord",
    "UpdateRunner",
    "jittered_backoff",
]
