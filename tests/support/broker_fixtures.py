"""Fixtures for MQTT brokers: real mosquitto on free loopback ports."""
