"""``python -m indexer`` runs the CLI."""

import sys

from indexer.cli import main

sys.exit(main())
