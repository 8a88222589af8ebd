"""Offline tooling that produces models for the registry (phantoms, simulation, training, benchmarks)."""

from __future__ import annotations


class TrainingError(Exception):
    """Root of every error raised by ``training``."""
