"""The ``indexer`` command: a thin entry point over the pipeline, search and store.

Exit codes: 0 all good · 1 finished, but some files failed · 2 usage, configuration or fatal error ·
130 interrupted (Ctrl-C; finished batches are kept and the next run resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from indexer import __version__
from indexer.errors import ConfigError, IndexerError
from indexer.records import RunSummary, SearchFilter
from indexer.settings import Settings, load_settings

log = logging.getLogger("indexer")

EXIT_OK, EXIT_FAILURES, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

Handler = Callable[[argparse.Namespace, Settings], int]


# --- argument parsing ------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--config", type=Path, help="config file (default: $INDEXER_CONFIG, else config/indexer.toml)")
    g.add_argument("--store", dest="store_dir", metavar="DIR", help="embedded store directory (Qdrant Edge)")
    g.add_argument("--qdrant-url", help="use a Qdrant server instead of the embedded store")
    g.add_argument("--api-key", help="Qdrant server API key")
    g.add_argument("--collection", help="collection name on the Qdrant server")
    g.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")


def _model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model options")
    g.add_argument("--model", dest="model_name", metavar="NAME_OR_JSON", help="open_clip architecture or config JSON")
    g.add_argument("--pretrained", help="open_clip pretrained tag (default: openai)")
    g.add_argument("--weights", metavar="FILE", help="weights file for the model")
    g.add_argument("--model-dir", metavar="DIR", help="directory holding (or caching) model weights")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="inference precision")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per model batch")
    g.add_argument("--workers", type=int, metavar="N", help="decode worker processes (0: one per CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="indexer",
        description="Index image folders with CLIP into Qdrant; search them by text or image.",
        epilog="Exit codes: 0 ok, 1 some files failed, 2 usage/configuration error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"indexer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_index(sub)
    _add_embed(sub)
    _add_search(sub)
    _add_status(sub)
    return parser


def _add_index(sub: Any) -> None:
    p = sub.add_parser("index", help="embed every image under PATH into the store (incremental)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    _common(p)
    _model_options(p)
    p.set_defaults(handler=cmd_index)


def _add_embed(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed images into a .parquet or .npy file (no store)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--output", "-o", type=Path, required=True, metavar="FILE", help="FILE.parquet or FILE.npy")
    _common(p)
    _model_options(p)
    p.set_defaults(handler=cmd_embed)


def _add_search(sub: Any) -> None:
    p = sub.add_parser("search", help="search the store by text or by image")
    p.add_argument("text", nargs="*", help="what to look for, e.g. 'a dog on the beach'")
    p.add_argument("--image", type=Path, action="append", default=[], metavar="FILE", help="images like this one")
    p.add_argument("--not", dest="negative", action="append", default=[], metavar="TEXT", help="what to avoid")
    p.add_argument("--limit", "-k", type=int, metavar="K", help="number of results (default 10)")
    p.add_argument("--offset", type=int, default=0, metavar="N", help="skip the first N results")
    p.add_argument("--threshold", type=float, metavar="S", help="minimum cosine score")
    p.add_argument("--folder", metavar="DIR", help="only images under this folder")
    p.add_argument("--format", dest="formats", action="append", default=[], metavar="FMT", help="e.g. JPEG, PNG")
    p.add_argument("--min-width", type=int, metavar="PX")
    p.add_argument("--min-height", type=int, metavar="PX")
    _common(p)
    _model_options(p)
    p.set_defaults(handler=cmd_search)


def _add_status(sub: Any) -> None:
    p = sub.add_parser("status", help="where the store is, which model, how many images, recent failures")
    p.add_argument("--failures", type=int, default=10, metavar="N", help="how many recent failures to list")
    _common(p)
    p.set_defaults(handler=cmd_status)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (flags win over environment, file and defaults)."""
    table = {
        "store_dir": ("store", "dir"),
        "qdrant_url": ("store", "qdrant_url"),
        "api_key": ("store", "api_key"),
        "collection": ("store", "collection"),
        "model_name": ("model", "name"),
        "pretrained": ("model", "pretrained"),
        "weights": ("model", "weights"),
        "model_dir": ("model", "dir"),
        "device": ("model", "device"),
        "dtype": ("model", "dtype"),
        "batch_size": ("model", "batch_size"),
        "workers": ("decode", "workers"),
    }
    out: dict[str, Any] = {}
    for attr, (section, key) in table.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


# --- commands --------------------------------------------------------------------------------------------------


def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.model import LazyModel
    from indexer.pipeline import check_roots, run_index, store_from_settings

    check_roots(args.paths)
    model = LazyModel(settings.model)
    with store_from_settings(settings) as store, _progress(args) as progress:
        summary = run_index(args.paths, settings, store, model, progress)
    return _report(summary, args)


def cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.model import LazyModel
    from indexer.pipeline import check_roots, run_embed

    check_roots(args.paths)
    with _progress(args) as progress:
        summary = run_embed(args.paths, args.output, settings, LazyModel(settings.model), progress)
    if not args.json:
        print(f"wrote {summary.indexed} embeddings to {args.output}")
    return _report(summary, args)


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.model import LazyModel
    from indexer.pipeline import store_from_settings
    from indexer.search import Query, search

    text = " ".join(args.text).strip()
    if not text and not args.image:
        raise ConfigError("query", "give a TEXT to search for, or --image FILE")
    query = Query(
        texts=(text,) if text else (),
        images=tuple(args.image),
        negative_texts=tuple(args.negative),
        limit=args.limit or settings.search.limit,
        offset=args.offset,
        threshold=args.threshold if args.threshold is not None else settings.search.threshold,
        filter=_filter(args),
    )
    with store_from_settings(settings) as store:
        hits = search(store, LazyModel(settings.model), query)
    if args.json:
        print(json.dumps([{"id": h.id, "score": h.score, **h.payload} for h in hits], indent=2))
    else:
        for hit in hits:
            print(f"{hit.score:.4f}  {hit.path}")
        if not hits:
            print("no matches", file=sys.stderr)
    return EXIT_OK


def _filter(args: argparse.Namespace) -> SearchFilter | None:
    folder = str(Path(args.folder).expanduser().absolute()) if args.folder else None
    found = SearchFilter(
        path_prefix=folder,
        formats=tuple(f.upper() for f in args.formats),
        min_width=args.min_width,
        min_height=args.min_height,
    )
    return None if found.is_empty() else found


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.pipeline import store_from_settings

    s = settings.store
    if not s.qdrant_url and not s.dir.exists():
        info: dict[str, Any] = {"store": str(s.dir), "model": None, "images": 0, "failed": 0, "failures": []}
    else:
        with store_from_settings(settings) as store:
            model = store.model_info()
            info = {
                "store": store.location,
                "model": model[0] if model else None,
                "dim": model[1] if model else None,
                "images": store.count() if model else 0,
                "failed": store.failure_count(),
                "failures": [
                    {"path": f.path, "reason": f.reason, "at": f.at} for f in store.failures(args.failures)
                ],
            }
    _print_status(info, args.json)
    return EXIT_OK


def _print_status(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"store:    {info['store']}")
    print(f"model:    {info['model'] or '(none yet: run indexer index PATH)'}")
    print(f"images:   {info['images']}")
    print(f"failures: {info['failed']}")
    for failure in info["failures"]:
        print(f"  {failure['path']}: {failure['reason']}")


# --- output ----------------------------------------------------------------------------------------------------


def _report(summary: RunSummary, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(
            f"indexed {summary.indexed}, unchanged {summary.unchanged}, moved {summary.moved}, "
            f"removed {summary.removed}, failed {summary.failed}"
            + (" (interrupted: run again to resume)" if summary.interrupted else "")
        )
        for failure in summary.failures:
            print(f"  failed: {failure.path}: {failure.reason}")
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


def _progress(args: argparse.Namespace) -> AbstractContextManager[Any]:
    """A progress bar on a terminal; nothing when stderr is a pipe or a file."""
    return _Bar() if sys.stderr.isatty() else nullcontext(None)


# --- main ------------------------------------------------------------------------------------------------------


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    handler: Handler = args.handler
    try:
        settings = load_settings(args.config, overrides_from_args(args))
        return handler(args, settings)
    except IndexerError as exc:
        print(f"indexer: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("indexer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
