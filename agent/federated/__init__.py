"""Federated personalization on the device: local data, eligibility, the NumPy trainer.

Nothing in this package sends anything anywhere: the local texts and the hidden states
derived from them stay on the device; only the Flower client (a separate module, the only
flwr importer on the device) hands an adapter *update* to the network.
"""
