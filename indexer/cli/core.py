"""The core commands: index, embed, search, status."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.cli.common import (
    EXIT_OK,
    common_options,
    model_options,
    progress_bar,
    report_summary,
)
from indexer.cli.distributed import cmd_embed_ray, cmd_index_ray, ray_options
from indexer.errors import ConfigError
from indexer.records import SEARCH_LIMIT, SearchFilter
from indexer.settings import Settings

if TYPE_CHECKING:
    from indexer.daemon.client import OwnerClient

FLAGS: dict[str, str] = {}  # flag → setting, applied by main(): none here beyond the common ones


def register(sub: Any) -> None:
    """Add the core subcommands to the parser."""
    _add_index(sub)
    _add_embed(sub)
    _add_search(sub)
    _add_status(sub)


def _add_index(sub: Any) -> None:
    p = sub.add_parser("index", help="embed every image under PATH into the store (incremental)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--retry-failed", action="store_true",
                   help="read again the files that failed before, even if unchanged since")  # fmt: skip
    common_options(p)
    model_options(p)
    ray_options(p, index=True)
    p.set_defaults(handler=cmd_index)


def _add_embed(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed images into a .parquet or .npy file (no store)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--output", "-o", type=Path, required=True, metavar="FILE",
                   help="FILE.parquet or FILE.npy (with --ray: a directory of part files)")  # fmt: skip
    common_options(p)
    model_options(p)
    ray_options(p)
    p.set_defaults(handler=cmd_embed)


def _add_search(sub: Any) -> None:
    p = sub.add_parser("search", help="search the store by text or by image")
    p.add_argument("text", nargs="*", help="what to look for, e.g. 'a dog on the beach'")
    p.add_argument("--image", type=Path, action="append", default=[], metavar="FILE", help="images like this one")
    p.add_argument("--not", dest="negative", action="append", default=[], metavar="TEXT", help="what to avoid")
    p.add_argument("--not-image", type=Path, action="append", default=[], metavar="FILE", help="images unlike this one")
    p.add_argument("--like", action="append", default=[], metavar="ID", help="indexed images like this one (its id)")
    p.add_argument("--not-like", action="append", default=[], metavar="ID", help="indexed images to move away from")
    p.add_argument("--limit", "-k", type=int, metavar="K", help=f"number of results (default {SEARCH_LIMIT})")
    p.add_argument("--offset", type=int, default=0, metavar="N", help="skip the first N results")
    p.add_argument("--threshold", type=float, metavar="S", help="minimum cosine score")
    p.add_argument("--folder", metavar="DIR", help="only images under this folder")
    p.add_argument("--format", dest="formats", action="append", default=[], metavar="FMT", help="e.g. JPEG, PNG")
    p.add_argument("--min-width", type=int, metavar="PX")
    p.add_argument("--min-height", type=int, metavar="PX")
    p.add_argument("--mtime-from", metavar="WHEN", help="modified at or after (ISO date/time or unix seconds)")
    p.add_argument("--mtime-to", metavar="WHEN", help="modified at or before (ISO date/time or unix seconds)")
    p.add_argument("--cluster", type=int, metavar="ID", help="only images of this cluster (see indexer cluster)")
    common_options(p)
    model_options(p)
    p.set_defaults(handler=cmd_search)


def _add_status(sub: Any) -> None:
    p = sub.add_parser("status", help="where the store is, which model, how many images, recent failures")
    p.add_argument("--failures", type=int, default=10, metavar="N", help="how many recent failures to list")
    common_options(p)
    p.set_defaults(handler=cmd_status)


def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.ingest.plan import check_roots

    roots = check_roots(args.paths)
    if args.ray:
        return cmd_index_ray(args, settings)
    owner = _owner(settings)
    if owner is not None:
        from indexer.cli.owned import index_through, open_after_owner

        summary = index_through(owner, roots, args)
        if summary is not None:
            return report_summary(summary, args)
    from indexer.ingest.pipeline import run_index
    from indexer.model.lazy import LazyModel
    from indexer.store.factory import open_store_from_settings, separate_process_wanted

    model = LazyModel(settings.model)
    separate = separate_process_wanted(settings)
    if owner is not None:  # it went away during the job: it may still be closing the store
        store = open_after_owner(lambda: open_store_from_settings(settings, separate_process=separate))
    else:
        store = open_store_from_settings(settings, separate_process=separate)
    with store, progress_bar(args) as progress:
        summary = run_index(args.paths, settings, store, model, progress, retry_failed=args.retry_failed)
    return report_summary(summary, args)


def cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.ingest.pipeline import check_roots, run_embed
    from indexer.model.lazy import LazyModel

    check_roots(args.paths)
    if args.ray:
        return cmd_embed_ray(args, settings)
    with progress_bar(args) as progress:
        summary = run_embed(args.paths, args.output, settings, LazyModel(settings.model), progress)
    return report_summary(summary, args, output=args.output)


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.model.lazy import LazyModel
    from indexer.search import Query, search
    from indexer.store.factory import open_store_from_settings

    text = " ".join(args.text).strip()
    if not text and not args.image and not args.like:
        raise ConfigError("query", "give a TEXT to search for, --image FILE or --like ID")
    limit, threshold = settings.search.resolve(args.limit, args.threshold)
    query = Query(
        texts=(text,) if text else (),
        images=tuple(args.image),
        negative_texts=tuple(args.negative),
        ids=tuple(args.like),
        negative_images=tuple(args.not_image),
        negative_ids=tuple(args.not_like),
        limit=limit,
        offset=args.offset,
        threshold=threshold,
        filter=_filter(args),
    )
    owner = _owner(settings)
    if owner is not None:
        hits = owner.search(query)
    else:
        model = LazyModel(settings.model)
        towers = [t for t, used in (("text", query.texts or query.negative_texts), ("visual", query.images)) if used]
        if towers or query.negative_images:
            model.start(*(towers or ["visual"]))  # the network loads while the store opens
        with open_store_from_settings(settings, read_only=True) as store:
            hits = search(store, model, query)
    if args.json:
        print(json.dumps([{"id": h.id, "score": h.score, **h.payload} for h in hits], indent=2))
    else:
        for hit in hits:
            print(f"{hit.score:.4f}  {hit.path}")
        if not hits:
            print("no matches", file=sys.stderr)
    return EXIT_OK


def _filter(args: argparse.Namespace) -> SearchFilter | None:
    from indexer.search import parse_time

    folder = str(Path(args.folder).expanduser().absolute()) if args.folder else None
    found = SearchFilter(
        path_prefix=folder,
        formats=tuple(f.upper() for f in args.formats),
        min_width=args.min_width,
        min_height=args.min_height,
        mtime_from=parse_time(args.mtime_from, "--mtime-from") if args.mtime_from else None,
        mtime_to=parse_time(args.mtime_to, "--mtime-to") if args.mtime_to else None,
        cluster=args.cluster,
    )
    return None if found.is_empty() else found


def _owner(settings: Settings) -> OwnerClient | None:
    """The running process owning the embedded store (`indexer watch`, `indexer serve`), if any: every command
    asks it (the store opens in one process only, and a second opener disturbs the holder)."""
    from indexer.daemon.client import owner_of

    return owner_of(settings)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.store.factory import open_store_from_settings
    from indexer.store.status import missing_store_status, store_status

    s = settings.store
    if not s.qdrant_url and not s.dir.exists():
        info: dict[str, Any] = missing_store_status(s.dir)
    elif (owner := _owner(settings)) is not None:
        info = owner.status(args.failures)
    else:
        with open_store_from_settings(settings, read_only=True) as store:
            info = store_status(store, args.failures)
    _print_status(info, args.json)
    if not args.json and info.get("daemon"):
        daemon = info["daemon"]
        print(f"daemon:   pid {daemon['pid']} at {daemon['url']}, {daemon['phase']}, {daemon['queue']} waiting")
    if not args.json and info.get("server"):
        print(f"server:   pid {info['server']['pid']} at {info['server']['url']} (indexer serve)")
    return EXIT_OK


def _print_status(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"store:    {info['store']}")
    print(f"model:    {info['model'] or '(none yet: run indexer index PATH)'}")
    print(f"images:   {info['images']}")
    print(f"failures: {info['failed']}")
    if info.get("warning"):
        print(f"WARNING:  {info['warning']}")
    for failure in info["failures"]:
        print(f"  {failure['path']}: {failure['reason']}")
