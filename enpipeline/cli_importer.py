"""Placeholder filled in by its owner."""

from __future__ import annotations

from typing import Any


def register(group: Any, add: Any) -> None:
    """Add this module's subcommands to ``group``."""
