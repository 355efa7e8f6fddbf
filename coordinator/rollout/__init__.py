"""Staged rollouts: the pure policy (:mod:`.policy`) and the runner that carries it out
(:mod:`.runner`). Import those modules directly; this package re-exports nothing, so the
registry can use the policy's types without importing the runner."""
