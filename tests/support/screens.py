"""Where the page tests save their screenshots: a temporary folder, or the docs' images on request.

The tracked images in docs/ are regenerated only with ``INDEXER_DOCS_SCREENSHOTS=1`` (``pytest tests/test_web.py
tests/test_web_review.py``); an ordinary run leaves the working tree as it found it.
"""

from __future__ import annotations

import os
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOCS_ENV = "INDEXER_DOCS_SCREENSHOTS"


def screenshot_path(name: str, tmp: Path) -> Path:
    """docs/NAME when the docs' images are being regenerated, else tmp/NAME."""
    folder = DOCS if os.environ.get(DOCS_ENV) == "1" else tmp
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
