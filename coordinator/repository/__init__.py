"""The TUF release repository: signing keys, bundles as targets, channel pointers.

See :mod:`coordinator.repository.repo` for the layout and invariants, and
:mod:`coordinator.repository.keys` for the key files.
"""

from coordinator.repository.keys import OFFLINE_ROLES, ONLINE_ROLES, ROLES, KeyRing, env_passphrases
from coordinator.repository.repo import ExpiryPolicy, PublishedBundle, Repository

__all__ = [
    "OFFLINE_ROLES",
    "ONLINE_ROLES",
    "ROLES",
    "ExpiryPolicy",
    "KeyRing",
    "PublishedBundle",
    "Repository",
    "env_passphrases",
]
