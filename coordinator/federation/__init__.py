"""Federated personalization on the coordinator: the Flower ServerApp, the SuperLink and
``flwr`` CLI it runs, round orchestration, DP accounting and adapter packaging."""
