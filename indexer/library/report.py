"""Self-contained HTML pages: the dedup contact sheet and the cluster overview.

Each image appears as a small JPEG thumbnail embedded in the page (base64 ``data:`` URI), so the file opens
anywhere, offline, and can be mailed around; each links to the original (``file://``). Every path and text is
HTML-escaped. A file that cannot be read shows a placeholder saying why instead of a thumbnail.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.atomicio import atomic_write_text
from indexer.records import DecodeLimits

if TYPE_CHECKING:
    from indexer.library.cluster import ClusterReport
    from indexer.library.dedup import DedupReport, Group

log = logging.getLogger(__name__)

THUMB_SIZE = 160
CLUSTER_IMAGES = 8

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.4em} section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em}
h2{font-size:1em;margin:.2em 0 .6em} .sheet{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:170px;font-size:.75em;overflow-wrap:anywhere}
figure img,.missing{width:160px;height:160px;object-fit:contain;background:#eee;display:block;border:3px solid #eee}
.keeper img{border-color:#2a2} .missing{display:flex;align-items:center;justify-content:center;text-align:center}
.tag{font-weight:bold} .keep{color:#2a2} .exact{color:#c22} .indirect{color:#888}
"""


def thumbnail_uri(path: str | Path, size: int = THUMB_SIZE) -> str:
    """A ``data:image/jpeg;base64,...`` thumbnail of the image (longest side ``size``); OSError or DecodeError
    (an IndexerError) when the file cannot be read or decoded."""
    from PIL import Image

    from indexer.decode.image import load_image

    limits = DecodeLimits()
    if os.path.getsize(path) > limits.max_file_bytes:
        raise OSError(f"larger than {limits.max_file_bytes} bytes")
    image = load_image(Path(path).read_bytes(), limits, draft_to=size, source=Path(path)).image
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(path: str, caption: str, *, css: str = "", size: int = THUMB_SIZE) -> str:
    """One thumbnail (or a placeholder) with its escaped path and caption (caption is HTML already)."""
    from indexer.errors import IndexerError

    name = html.escape(path)
    try:
        picture = f'<img src="{thumbnail_uri(path, size)}" alt="{name}" loading="lazy">'
    except (OSError, IndexerError) as exc:
        log.debug("no thumbnail for %s: %s", path, exc)
        picture = f'<div class="missing">cannot show it:<br>{html.escape(str(exc).splitlines()[0])}</div>'
    href = html.escape(Path(path).absolute().as_uri()) if Path(path).is_absolute() else ""
    linked = f'<a href="{href}">{picture}</a>' if href else picture
    return f'<figure class="{css}">{linked}<figcaption>{caption}<br>{name}</figcaption></figure>'


def _page(title: str, summary: str, sections: Iterable[str]) -> str:
    body = "\n".join(sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1><p>{summary}</p>\n{body}\n</body></html>\n"
    )


def _dedup_section(number: int, group: Group) -> str:
    k = group.keeper
    figures = [_figure(k.path, f'<span class="tag keep">keep</span> {k.width}×{k.height}', css="keeper")]
    for m in group.members:
        kind = '<span class="tag exact">exact copy</span>' if m.exact else ""
        if not m.direct:
            kind += ' <span class="tag indirect">linked via another</span>'
        caption = f"{m.score:.4f} {kind} {m.item.width}×{m.item.height}"
        figures.append(_figure(m.item.path, caption))
    title = f"<h2>group {number}: {len(group.members) + 1} images</h2>"
    return f'<section>{title}<div class="sheet">{"".join(figures)}</div></section>'


def dedup_page(report: DedupReport, max_groups: int = 500) -> str:
    """The contact sheet: one row per group (the keeper first, framed green), scores to the keeper."""
    what = "same sha256" if report.threshold is None else f"cosine ≥ {report.threshold:.3f}"
    summary = (
        f"{html.escape(report.tier)} tier ({html.escape(what)}): {len(report.groups)} groups, "
        f"{report.duplicates} duplicates among {report.scanned} images."
    )
    shown = report.groups[:max_groups]
    if len(report.groups) > len(shown):
        summary += f" The {len(shown)} largest groups are shown; --json or --csv lists them all."
    sections = (_dedup_section(i, g) for i, g in enumerate(shown, 1))
    return _page(f"indexer dedup: {report.tier}", summary, sections)


def cluster_page(report: ClusterReport, images: int = CLUSTER_IMAGES) -> str:
    """The overview: one row per cluster (largest first) with its size and the images nearest its centre."""
    how = f"chosen by silhouette ({report.silhouette:.3f})" if report.silhouette is not None else "as asked"
    summary = f"{report.points} images in {len(report.clusters)} clusters (k = {report.k}, {html.escape(how)})."
    sections = []
    for c in report.clusters:
        figures = "".join(_figure(p, "") for p in c.representatives[:images])
        title = f"cluster {c.id}: {c.size} images (search with --cluster {c.id})"
        sections.append(f'<section><h2>{html.escape(title)}</h2><div class="sheet">{figures}</div></section>')
    return _page("indexer cluster", summary, sections)


def write_page(path: Path, page: str) -> None:
    """Write the page atomically (a temporary file renamed into place)."""
    atomic_write_text(path, page)
