"""Fixtures for models: the tiny test model and the real Nano model."""
