"""Alembic migrations of the registry; shipped inside the package, run by ``migrate.py``."""
