"""What every subcommand shares: common flags, flags → settings overrides, summaries, progress bars."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.errors import EXIT_ERROR, EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK
from indexer.records import RunSummary
from indexer.settings import Settings

if TYPE_CHECKING:
    from indexer.store.protocol import VectorStore

__all__ = ["EXIT_ERROR", "EXIT_FAILURES", "EXIT_INTERRUPTED", "EXIT_OK"]


# Each CLI module declares its flags → settings once, as a FLAGS table (argparse dest → dotted setting);
# main() applies them all in one place. These are the flags of common_options and model_options.
COMMON_FLAGS: dict[str, str] = {
    "store_dir": "store.dir",
    "qdrant_url": "store.qdrant_url",
    "api_key": "store.api_key",
    "collection": "store.collection",
    "model_name": "model.name",
    "pretrained": "model.pretrained",
    "weights": "model.weights",
    "model_dir": "model.dir",
    "device": "model.device",
    "dtype": "model.dtype",
    "batch_size": "model.batch_size",
    "workers": "decode.workers",
}


def common_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--config", type=Path, help="config file (default: $INDEXER_CONFIG, else config/indexer.toml)")
    g.add_argument("--store", dest="store_dir", metavar="DIR", help="embedded store directory (Qdrant Edge)")
    g.add_argument("--qdrant-url", help="use a Qdrant server instead of the embedded store")
    g.add_argument("--api-key", help="Qdrant server API key")
    g.add_argument("--collection", help="collection name on the Qdrant server")
    g.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")


def model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model options")
    g.add_argument("--model", dest="model_name", metavar="NAME_OR_JSON", help="open_clip architecture or config JSON")
    g.add_argument("--pretrained", help="open_clip pretrained tag (default: openai)")
    g.add_argument("--weights", metavar="FILE", help="weights file for the model")
    g.add_argument("--model-dir", metavar="DIR", help="directory holding (or caching) model weights")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="inference precision")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per model batch")
    g.add_argument("--workers", type=int, metavar="N", help="decode worker processes (0: one per CPU)")


def overrides_from_args(args: argparse.Namespace, flags: Mapping[str, str] = COMMON_FLAGS) -> dict[str, Any]:
    """The settings given as flags, as nested dicts for `load_settings` (flags win over environment, file and
    defaults): each ``flags`` entry maps an argparse dest to a dotted setting; flags left out (None) are skipped."""
    out: dict[str, Any] = {}
    for dest, dotted in flags.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        *sections, key = dotted.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return out


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 file"``, ``"2 files"`` (``many``: an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def report_summary(summary: RunSummary, args: argparse.Namespace, *, output: Path | None = None) -> int:
    """Print what a run did (``output``: an `indexer embed` file, so the store's counts mean nothing) and return
    its exit code: failures that are new make it 1; known failures (unchanged since they failed) do not."""
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        if output is not None:
            done = f", {summary.unchanged} already there" if summary.unchanged else ""  # --ray: parts done before
            head = f"wrote {plural(summary.indexed, 'embedding')} to {output}{done}, failed {summary.failed}"
        else:
            head = (
                f"indexed {summary.indexed}, unchanged {summary.unchanged}, moved {summary.moved}, "
                f"removed {summary.removed}, failed {summary.failed}"
            )
        print(head + (" (interrupted: run again to resume)" if summary.interrupted else ""))
        for failure in summary.failures:
            print(f"  failed: {failure.path}: {failure.reason}")
        if summary.known_failures:
            print(f"{plural(summary.known_failures, 'known failure')} (indexer status lists them; "
                  "--retry-failed reads them again)")  # fmt: skip
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILURES if summary.failed else EXIT_OK


class _Bar:
    """A tqdm progress bar with rate and ETA, on stderr."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, total: int, what: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=what, unit="img", file=sys.stderr, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(args: argparse.Namespace) -> AbstractContextManager[Any]:
    """A progress bar on a terminal; nothing when stderr is a pipe or a file."""
    return _Bar() if sys.stderr.isatty() else nullcontext(None)


def library_store(settings: Settings, *, read_only: bool = False) -> VectorStore:
    """The store a library command works on: while a process owns the embedded store (`indexer watch`,
    `indexer serve`), that owner's, through its control routes; else the store, opened here."""
    from indexer.daemon.client import owner_of

    owner = owner_of(settings)
    if owner is not None:
        from indexer.daemon.remote import RemoteStore

        return RemoteStore(owner)
    from indexer.store.factory import open_store_from_settings

    return open_store_from_settings(settings, read_only=read_only)
