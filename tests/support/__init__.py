"""Helpers shared by the tests: model files, reference models, processes, cache stores."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
