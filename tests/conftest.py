"""Fixtures live in tests/support/*_fixtures.py, one module per area, registered here."""

pytest_plugins = [
    "tests.support.model_fixtures",
    "tests.support.broker_fixtures",
    "tests.support.db_fixtures",
]
