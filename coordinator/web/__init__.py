"""The coordinator's HTTP side: repository files, health and metrics, and the seam where
the operator API and the dashboard are included (:mod:`.app`)."""

from coordinator.web.app import REPO_PREFIX, Health, RouterFactory, WebContext, create_app
from coordinator.web.repo_files import parse_range, repo_files_router, resolve

__all__ = [
    "REPO_PREFIX",
    "Health",
    "RouterFactory",
    "WebContext",
    "create_app",
    "parse_range",
    "repo_files_router",
    "resolve",
]
