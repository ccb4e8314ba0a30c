"""`indexer dedup / cluster / export / import`: whole-library tools over the stored vectors."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add this module's subcommands to the parser (none yet)."""
