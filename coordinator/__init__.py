"""The nanofleet coordinator: fleet registry, TUF repository, rollouts, federated rounds.

The coordinator never imports the agent; both sides share only :mod:`protocol`.
"""

__version__ = "0.1.0"
