"""`indexer dedup / cluster / export / import`: whole-library tools over the stored vectors.

None of them needs the model: they read (and write) the store only. Heavy modules load inside the handlers.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from indexer.atomicio import atomic_open
from indexer.cli.common import EXIT_FAILURES, EXIT_OK, common_options, library_store, plural, progress_bar
from indexer.errors import ConfigError
from indexer.records import SearchFilter
from indexer.settings import Settings

if TYPE_CHECKING:
    from indexer.library.actions import Action, ActionPlan
    from indexer.library.cluster import ClusterReport
    from indexer.library.dedup import DedupReport
    from indexer.store.protocol import VectorStore

TIER_CHOICES = ("exact", "near", "similar")

FLAGS: dict[str, str] = {"cluster_device": "cluster.device"}  # flag → setting, applied by main()


def register(sub: Any) -> None:
    """Add dedup, cluster, export and import to the parser."""
    _add_dedup(sub)
    _add_cluster(sub)
    _add_export(sub)
    _add_import(sub)


def _add_dedup(sub: Any) -> None:
    p = sub.add_parser(
        "dedup",
        help="find duplicate images; move or delete the extra copies only when asked",
        description="Tiers: exact (same sha256), near (cosine >= dedup.near_threshold, default 0.95: crops, "
        "resizes, re-encodes), similar (cosine >= dedup.similar_threshold, default 0.90). Each group has a "
        "suggested keeper (highest resolution, then oldest). Without --move-to or --delete nothing changes.",
    )
    p.add_argument("--tier", choices=TIER_CHOICES, default="near", help="which duplicates (default: near)")
    p.add_argument("--threshold", type=float, metavar="S", help="cosine threshold instead of the tier's setting")
    p.add_argument("--folder", metavar="DIR", help="only images under this folder")
    p.add_argument(
        "--exact",
        action="store_true",
        help="compare every pair (default: exact up to dedup.exact_up_to images on the CPU, always on a GPU; "
        "k-means cells beyond, which may miss a rare pair)",
    )
    p.add_argument(
        "--device", metavar="DEV", help="where the exact pass runs: auto (a GPU when CUDA is present), cpu, cuda[:N]"
    )
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write the groups as CSV")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write a contact sheet with thumbnails")
    act = p.add_mutually_exclusive_group()
    act.add_argument(
        "--move-to",
        nargs="?",
        const="",
        metavar="DIR",
        help="keep each keeper, move its duplicates under DIR (same relative paths; default: dedup.duplicates_dir); "
        "they leave the index unless DIR lies under watch.paths or serve.roots",
    )
    act.add_argument("--delete", action="store_true", help="keep each keeper, delete its duplicates (needs --yes)")
    p.add_argument("--yes", action="store_true", help="confirm --delete")
    common_options(p)
    p.set_defaults(handler=cmd_dedup)


def _add_cluster(sub: Any) -> None:
    p = sub.add_parser("cluster", help="k-means clusters of the stored images; search them with --cluster ID")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--k", type=int, metavar="N", help="number of clusters (default: cluster.k, 0 = --auto)")
    how.add_argument("--auto", action="store_true", help="choose the number of clusters by silhouette")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write an overview page with thumbnails")
    p.add_argument(
        "--device",
        dest="cluster_device",
        metavar="DEV",
        help="where the centres are refined: auto (Lloyd's k-means on a GPU when CUDA is present, else the CPU), "
        "cpu (one MiniBatchKMeans pass), cuda[:N] (default: cluster.device)",
    )
    common_options(p)
    p.set_defaults(handler=cmd_cluster)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="write the store (ids, paths, metadata, vectors) to a Parquet file")
    p.add_argument("--output", "-o", type=Path, required=True, metavar="FILE", help="FILE.parquet")
    p.add_argument("--folder", metavar="DIR", help="only images under this folder")
    common_options(p)
    p.set_defaults(handler=cmd_export)


def _add_import(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="load an `indexer export` or `indexer embed` Parquet file, or a directory of them, into the store",
    )
    p.add_argument(
        "file", type=Path, metavar="FILE|DIR", help="a Parquet file, or a directory of *.parquet parts (embed --ray)"
    )
    common_options(p)
    p.set_defaults(handler=cmd_import)


def _folder_filter(folder: str | None) -> SearchFilter | None:
    if not folder:
        return None
    path = Path(folder).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError("--folder", f"{path} is not a directory")
    return SearchFilter(path_prefix=str(path))


def _check_output(path: Path | None, flag: str) -> None:
    if path is not None and not path.absolute().parent.is_dir():
        raise ConfigError(flag, f"directory {path.absolute().parent} does not exist")


def _advance(bar: Any, what: str) -> Callable[[int, int], None] | None:
    """An ``on_rows(done, total)`` that moves the progress bar (None without one: not a terminal)."""
    if bar is None:
        return None
    shown = [0]

    def on_rows(done: int, total: int) -> None:
        if shown[0] == 0:
            bar.start(total, what)
        bar.advance(done - shown[0])
        shown[0] = done

    return on_rows


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# --- dedup -----------------------------------------------------------------------------------------------------


def cmd_dedup(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.library.dedup import PairPlan, find_duplicates, tier_threshold

    threshold = tier_threshold(args.tier, settings.dedup, args.threshold)
    if args.yes and not args.delete:
        raise ConfigError("--yes", "confirms --delete, which was not given")
    for path, flag in ((args.csv, "--csv"), (args.html, "--html")):
        _check_output(path, flag)
    flt = _folder_filter(args.folder)
    args.move_to = _move_to(args.move_to, settings)
    acts = args.move_to is not None or args.delete
    with library_store(settings, read_only=not acts) as store:
        plan = PairPlan.from_settings(settings.dedup, exact=args.exact, device=args.device)
        report = find_duplicates(
            store, args.tier, threshold=threshold, filter=flt, block=settings.dedup.block_size, plan=plan
        )
        _write_dedup_files(report, args, settings)
        if args.move_to is None and not args.delete:
            _print_dedup(report, None, args.json)
            return EXIT_OK
        return _act(report, args, store, flt, settings)


def _move_to(flag: str | None, settings: Settings) -> Path | None:
    """--move-to's folder: DIR, or dedup.duplicates_dir when the flag has no DIR (a str: no Path('') = '.')."""
    if flag is None:
        return None
    if flag:
        return Path(flag)
    if not settings.dedup.duplicates_dir:
        raise ConfigError("--move-to", "give DIR, or set dedup.duplicates_dir")
    return Path(settings.dedup.duplicates_dir).expanduser()


def _write_dedup_files(report: DedupReport, args: argparse.Namespace, settings: Settings) -> None:
    if args.csv is not None:
        _write_csv(report, args.csv)
    if args.html is not None:
        from indexer.library.report import dedup_page, write_page

        write_page(args.html, dedup_page(report, settings.dedup.report_max_groups))


def _act(
    report: DedupReport, args: argparse.Namespace, store: VectorStore, flt: SearchFilter | None, settings: Settings
) -> int:
    """Print the dry-run summary, then (unless --delete lacks --yes) move or delete, file by file."""
    from indexer.library.actions import Places, apply_plan, plan_actions

    root = Path(flt.path_prefix) if flt is not None and flt.path_prefix else None
    places = Places.for_cli(settings)
    plan = plan_actions(report, move_to=args.move_to, delete=args.delete, root=root, places=places, store=store)
    out = sys.stderr if args.json else sys.stdout
    if not args.json:
        _print_dedup(report, None, False)
    _print_plan(plan, args, out)
    if args.delete and not args.yes:
        raise ConfigError(
            "--delete", f"nothing was deleted: add --yes to delete the {plural(len(plan.actions), 'file')} above"
        )
    apply_plan(plan, store, on_each=lambda action, error: _print_done(action, error, out))
    if args.json:
        _print_dedup(report, plan, True)
    else:
        verb = "moved" if args.move_to is not None else "deleted"
        print(
            f"{verb} {plural(len(plan.done), 'file')}, {len(plan.failed)} failed, {len(plan.skipped)} left alone",
            file=out,
        )
    return EXIT_FAILURES if plan.problems else EXIT_OK


def _print_plan(plan: ActionPlan, args: argparse.Namespace, out: TextIO) -> None:
    files = f"{plural(len(plan.actions), 'file')} ({_human_bytes(plan.bytes)})"
    if args.move_to is not None:
        head = f"dry run: move {files} to {args.move_to.absolute()}"
    else:
        head = f"dry run: delete {files}"
    print(f"{head}; keepers stay; {plural(len(plan.skipped), 'duplicate')} left alone", file=out)
    if plan.target_root is not None:
        stays = (
            "under an indexed folder: the moved files stay in"
            if plan.stays_indexed
            else "not under an indexed folder: the moved files leave"
        )
        print(f"  ({plan.target_root} is {stays} the index)", file=out)
    for a in plan.actions:
        print(f"  {a.kind} {a.item.path}" + (f" -> {a.target}" if a.target is not None else ""), file=out)
    for s in plan.skipped:
        print(f"  leave {s.path}: {s.reason}", file=out)
    out.flush()


def _print_done(action: Action, error: str | None, out: TextIO) -> None:
    if error is not None:
        print(f"skipping {action.item.path}: {error}", file=out)
    elif action.kind == "move":
        print(f"moved {action.item.path} -> {action.target}", file=out)
    else:
        print(f"deleted {action.item.path}", file=out)
    out.flush()


def _print_dedup(report: DedupReport, plan: ActionPlan | None, as_json: bool) -> None:
    if as_json:
        doc = report.as_dict() | ({"actions": plan.as_dict()} if plan is not None else {})
        print(json.dumps(doc, indent=2))
        return
    what = "exact copies (same sha256)" if report.threshold is None else f"cosine >= {report.threshold:.3f}"
    print(
        f"{report.tier} tier, {what}: {plural(len(report.groups), 'group')}, "
        f"{plural(report.duplicates, 'duplicate')} among "
        f"{plural(report.scanned, 'image')} ({_human_bytes(report.duplicate_bytes)} in duplicates)"
    )
    for group in report.groups:
        k = group.keeper
        print(f"\nkeep    {k.path}  {k.width}x{k.height}")
        for m in group.members:
            notes = ("  exact copy" if m.exact else "") + ("" if m.direct else "  (linked via another duplicate)")
            print(f"  {m.score:.4f}  {m.item.path}  {m.item.width}x{m.item.height}{notes}")


CSV_COLUMNS = ("group", "role", "path", "score", "exact", "direct", "width", "height", "size", "mtime", "sha256", "id")


def _write_csv(report: DedupReport, path: Path) -> None:
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for number, group in enumerate(report.groups, 1):
            k = group.keeper
            writer.writerow([number, "keeper", k.path, "", "", "", k.width, k.height, k.size, k.mtime, k.sha256, k.id])
            for m in group.members:
                it = m.item
                row = [number, "duplicate", it.path, f"{m.score:.6f}", m.exact, m.direct, it.width, it.height]
                writer.writerow([*row, it.size, it.mtime, it.sha256, it.id])


# --- cluster ---------------------------------------------------------------------------------------------------


def cmd_cluster(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.library.cluster import cluster_store, resolve_k

    k = resolve_k(args.k, args.auto, settings.cluster)
    _check_output(args.html, "--html")
    with library_store(settings) as store:
        report = cluster_store(store, settings.cluster, k=k)
    if args.html is not None:
        from indexer.library.report import cluster_page, write_page

        write_page(args.html, cluster_page(report))
    _print_clusters(report, args.json)
    return EXIT_OK


def _print_clusters(report: ClusterReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    how = f"k chosen by silhouette {report.silhouette:.3f}" if report.silhouette is not None else f"k = {report.k}"
    clusters = f"{plural(len(report.clusters), 'cluster')} of {plural(report.points, 'image')}"
    print(f"{clusters} ({how}); search one with --cluster ID")
    for c in report.clusters:
        print(f"cluster {c.id}: {plural(c.size, 'image')}, e.g. " + ", ".join(c.representatives[:3]))


# --- export and import -------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.library.export import export_store

    flt = _folder_filter(args.folder)
    with library_store(settings, read_only=True) as store:
        written = export_store(store, args.output, filter=flt)
    if args.json:
        print(json.dumps({"exported": written, "output": str(args.output)}))
    else:
        print(f"exported {plural(written, 'image')} to {args.output}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from indexer.library.export import import_file

    with library_store(settings) as store, progress_bar(args) as bar:
        summary = import_file(
            store, args.file, optimize_after=settings.store.optimize_after, on_rows=_advance(bar, "importing")
        )
        location = store.location
    if args.json:
        print(json.dumps(summary.as_dict() | {"store": location}, indent=2))
        return EXIT_OK
    print(f"imported {plural(summary.imported, 'image')} ({summary.model}, {summary.dim}-d) into {location}")
    if summary.unverified:
        print(
            f"{plural(len(summary.unverified), 'file')} {'is' if len(summary.unverified) == 1 else 'are'} missing or "
            "changed since embedded: "
            "the next `indexer index` embeds them again"
        )
    return EXIT_OK
