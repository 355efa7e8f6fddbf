"""The registry contract suite: the same tests against SQLite and PostgreSQL."""
