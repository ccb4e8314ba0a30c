"""``python -m indexer`` runs the CLI."""

from indexer.cli import run

run()
