"""Shard stage: read img2dataset / WebDataset tar shards and turn their samples into decoded images.

A shard ``NNNN.tar`` holds samples as consecutive members sharing a key: ``KEY.jpg`` (or png, webp, ...), with an
optional ``KEY.txt`` (the caption) and ``KEY.json`` (the downloader's metadata). A sibling ``NNNN.parquet`` is the
downloader's own table and is not an input. An image in a shard is addressed ``/abs/NNNN.tar#KEY``; its point id
is derived from that address as a file's is from its path.

Shards are read with the standard library's ``tarfile`` (measured: ≈ 12x faster than Ray's ``read_webdataset``,
which also trips over the sibling Parquet files), seeking past the members it does not need, so a part of a shard
(``start``/``stop`` sample numbers) costs only its own bytes plus the headers before it. A bad member (truncated,
not an image, too large) is a Failure with a reason; a shard cut short keeps every sample before the cut.

Incremental indexing: every point of a shard carries the shard's size and mtime (``shard_size``,
``shard_mtime_ns``); a shard whose size and mtime are unchanged is not read again.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.decode.image import SUPPORTED_EXTENSIONS, decode_bytes
from indexer.records import Decoded, DecodeLimits, Failure, FileEntry, ImageMeta, PreprocessSpec, StoredPoint
from indexer.sources.scan import normalise_root

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
SEPARATOR = "#"
_CAPTION_EXTS = (".txt", ".caption")
_JSON_EXTS = (".json",)
_MAX_SIDECAR_BYTES = 1 << 20  # captions and metadata are small; more is not read
SHARD_PENDING = -1  # shard_mtime_ns of points whose shard is still being indexed (never "unchanged")


@dataclass(frozen=True, slots=True)
class ShardMeta(ImageMeta):
    """An image read from a shard: ``path`` is the address ``SHARD#KEY``; caption and JSON text as in the shard."""

    shard: str
    key: str
    shard_size: int
    caption: str | None
    json: str | None

    def extra_payload(self) -> dict[str, Any]:
        """shard, key, shard_size, shard_mtime_ns, and caption / metadata where the sample has them."""
        fields: dict[str, Any] = {
            "shard": self.shard,
            "key": self.key,
            "shard_size": self.shard_size,
            "shard_mtime_ns": self.mtime_ns,
        }
        if self.caption is not None:
            fields["caption"] = self.caption
        if self.json is not None:
            fields["metadata"] = parse_json(self.json)
        return fields


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample of a shard: the image member's bytes and the sample's caption and JSON metadata (text)."""

    key: str
    image_name: str
    data: bytes
    caption: str | None
    json: str | None


def address(shard: Path | str, key: str) -> str:
    """The stable address of an image in a shard."""
    return f"{shard}{SEPARATOR}{key}"


def is_shard(path: Path) -> bool:
    return path.suffix.lower() == SHARD_SUFFIX


def find_shards(roots: Iterable[Path], include_hidden: bool = False) -> list[FileEntry]:
    """Every ``.tar`` shard given as a root or found under a root folder, sorted by path within each root."""
    found: list[FileEntry] = []
    for root in roots:
        root = normalise_root(root)
        if root.is_file():
            if is_shard(root):
                found.extend(_entry(root))
            continue
        found.extend(_entries_under(root, include_hidden))
    return found


def _entries_under(root: Path, include_hidden: bool) -> list[FileEntry]:
    out: list[FileEntry] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if include_hidden or not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(SHARD_SUFFIX) and (include_hidden or not name.startswith(".")):
                out.extend(_entry(Path(directory) / name))
    return out


def _entry(path: Path) -> list[FileEntry]:
    try:
        st = path.stat()
    except OSError as exc:
        log.warning("skipping %s: cannot stat: %s", path, exc.strerror or exc)
        return []
    return [FileEntry(path, st.st_size, st.st_mtime_ns)]


def has_shards(roots: Iterable[Path]) -> bool:
    """Whether any root is a shard or a folder holding one (the shard path is then needed)."""
    return bool(find_shards(roots))


# --- reading -------------------------------------------------------------------------------------------------


def _split(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the member path up to the first dot of its base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, (dot + ext).lower()


def _groups(tf: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """Consecutive regular members sharing a key (a WebDataset sample)."""
    key: str | None = None
    members: list[tarfile.TarInfo] = []
    for member in tf:
        if not member.isfile():
            continue
        member_key, _ = _split(member.name)
        if member_key != key and members:
            yield key or "", members
            members = []
        key = member_key
        members.append(member)
    if members:
        yield key or "", members


def _image_member(members: list[tarfile.TarInfo]) -> tarfile.TarInfo | None:
    for member in members:
        ext = _split(member.name)[1]
        if ext in SUPPORTED_EXTENSIONS:
            return member
    return None


def _text(tf: tarfile.TarFile, members: list[tarfile.TarInfo], exts: tuple[str, ...]) -> str | None:
    for member in members:
        if _split(member.name)[1] in exts and member.size <= _MAX_SIDECAR_BYTES:
            handle = tf.extractfile(member)
            if handle is not None:
                return handle.read().decode("utf-8", errors="replace").strip()
    return None


def iter_samples(
    shard: Path, limits: DecodeLimits, start: int = 0, stop: int | None = None
) -> Generator[Sample | Failure, None, None]:
    """The samples numbered ``start`` to ``stop`` (those with an image member, counted from 0), or Failures.

    A member too large, unreadable or cut short is a Failure naming ``SHARD#KEY``; a shard that is no tar at all
    or is cut short yields one Failure for the shard and stops (the samples before the cut are kept).
    """
    number = -1
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for key, members in _groups(tf):
                image = _image_member(members)
                if image is None:
                    continue
                number += 1
                if number < start:
                    continue
                if stop is not None and number >= stop:
                    return
                yield _read_sample(tf, shard, key, image, members, limits)
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f"after sample {number}" if number >= 0 else "at its start"
        yield Failure(shard, f"unreadable shard {where}: {_tar_reason(exc)}")


def _read_sample(
    tf: tarfile.TarFile, shard: Path, key: str, image: tarfile.TarInfo, members: list[tarfile.TarInfo],
    limits: DecodeLimits,
) -> Sample | Failure:  # fmt: skip
    where = Path(address(shard, key))
    if image.size > limits.max_file_bytes:
        return Failure(where, f"file too large: {image.size} bytes exceeds max_file_bytes {limits.max_file_bytes}")
    try:
        handle = tf.extractfile(image)
        data = handle.read() if handle is not None else b""
        caption = _text(tf, members, _CAPTION_EXTS)
        meta = _text(tf, members, _JSON_EXTS)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return Failure(where, f"truncated shard member: {_tar_reason(exc)}")
    if len(data) != image.size:
        return Failure(where, "truncated shard member")
    return Sample(key, image.name, data, caption, meta)


def _tar_reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def count_samples(shard: Path) -> int:
    """How many samples with an image the shard holds (reads headers only); 0 when it is unreadable."""
    count = 0
    try:
        with tarfile.open(shard, mode="r:") as tf:
            count = sum(1 for _, members in _groups(tf) if _image_member(members) is not None)
    except (tarfile.TarError, OSError, EOFError):
        pass  # iter_samples reports why
    return count


# --- decoding ------------------------------------------------------------------------------------------------


def decode_sample(sample: Sample, shard: FileEntry, spec: PreprocessSpec, limits: DecodeLimits) -> Decoded | Failure:
    """A sample's image decoded to model-ready pixels, its metadata a ShardMeta (caption and JSON kept)."""
    where = Path(address(shard.path, sample.key))
    found = decode_bytes(sample.data, where, shard.mtime_ns, spec, limits)
    if isinstance(found, Failure):
        return found
    m = found.meta
    meta = ShardMeta(
        m.path, m.size, m.mtime_ns, m.sha256, m.width, m.height, m.format,
        str(shard.path), sample.key, shard.size, sample.caption, sample.json,
    )  # fmt: skip
    return Decoded(meta, found.pixels)


def decode_shard(
    shard: FileEntry,
    spec: PreprocessSpec,
    limits: DecodeLimits,
    start: int = 0,
    stop: int | None = None,
    threads: int = 1,
) -> Generator[Decoded | Failure, None, None]:
    """Decode a shard's samples ``start`` to ``stop`` in this process, in order, on ``threads`` threads.

    The tar is read on the calling thread; decoding (PIL's decoder, the resize and the sha256 let go of the GIL)
    runs on a thread pool with at most ``4 * threads`` samples in flight: 2 threads decode 12 MP JPEGs 1.9-2.1x as
    fast as one on the 2-core test machine. Closing the generator early cancels what is queued."""
    samples = iter_samples(shard.path, limits, start, stop)

    def decode(item: Sample | Failure) -> Decoded | Failure:
        return item if isinstance(item, Failure) else decode_sample(item, shard, spec, limits)

    if threads <= 1:
        yield from map(decode, samples)
        return
    pending: deque[Future[Decoded | Failure]] = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-decode")
    try:
        for item in samples:
            pending.append(pool.submit(decode, item))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        samples.close()  # the tar file


def decode_shards(
    shards: Iterable[FileEntry], spec: PreprocessSpec, limits: DecodeLimits, threads: int = 1
) -> Iterator[Decoded | Failure]:
    """Decode every sample of ``shards`` in this process, shard after shard (see `decode_shard`)."""
    for shard in shards:
        yield from decode_shard(shard, spec, limits, threads=threads)


# --- payload and incremental state ------------------------------------------------------------------------------


def parse_json(text: str) -> Any:
    """A sample's JSON metadata as an object; text that is not JSON is kept as text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def is_shard_point(point: StoredPoint) -> bool:
    return bool(point.payload.get("shard"))


def shard_unchanged(shard: FileEntry, points: list[StoredPoint]) -> bool:
    """The stored points of a shard were made from this very shard file (same size and mtime)."""
    return bool(points) and all(
        p.payload.get("shard_size") == shard.size and p.payload.get("shard_mtime_ns") == shard.mtime_ns for p in points
    )
