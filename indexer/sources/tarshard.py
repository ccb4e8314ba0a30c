"""Reading tar shards member by member: which members form a sample, which are skipped and why, and the bytes of
a sample (`indexer.sources.shards` decodes them; `indexer serve` sends one).

Members are read in order with ``tarfile`` and forgotten once read (nothing but the sample being gathered and the
hashes of the keys seen is held, whatever the shard's size). Entries are numbered the same way by every reader
(`iter_samples`, `count_samples`), so a part of a shard (``start``/``stop``) reports each entry exactly once.
Skipped, with a reason: members that are not regular files (links, devices, FIFOs), names that are not UTF-8 (no
store takes them), a second image in one sample, a key seen earlier in the shard (its point would overwrite the
first one's). A shard that is not a regular file, or is compressed, is not opened for reading at all.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from indexer.decode.image import SUPPORTED_EXTENSIONS
from indexer.errors import DecodeError
from indexer.records import DecodeLimits, Failure, display_path, name_problem
from indexer.sources.scan import special_kind

SHARD_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")  # reported, not read
SEPARATOR = "#"
_CAPTION_EXTS = (".txt", ".caption")
_JSON_EXTS = (".json",)
_MAX_SIDECAR_BYTES = 1 << 20  # captions and metadata are small; more is not read


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


def is_compressed(path: Path) -> bool:
    return path.name.lower().endswith(COMPRESSED_SUFFIXES)


def _split(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the member path up to the first dot of its base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, (dot + ext).lower()


@dataclass(slots=True)
class _Group:
    """A sample being gathered: its image member and its first caption and JSON members (nothing more is kept,
    however many members share the key)."""

    key: str
    image: tarfile.TarInfo | None = None
    caption: tarfile.TarInfo | None = None
    json: tarfile.TarInfo | None = None


@dataclass(frozen=True, slots=True)
class _Skip:
    """A member (or a sample) that is reported and not read: ``where`` is its address, ``reason`` why."""

    where: str
    reason: str


_Entry = _Group | _Skip


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members in order, forgetting each header once read: ``tarfile`` keeps every header it has read in
    ``members`` (a shard of a million empty members held ≈ 430 MB), and nothing here looks back."""
    while (member := tf.next()) is not None:
        tf.members.clear()  # type: ignore[attr-defined]  # (not in typeshed)
        yield member


def _member_kind(member: tarfile.TarInfo) -> str:
    kinds = [
        (member.issym(), "a symbolic link"),
        (member.islnk(), "a hard link"),
        (member.ischr(), "a character device"),
        (member.isblk(), "a block device"),
        (member.isfifo(), "a FIFO"),
    ]
    return next((name for test, name in kinds if test), "a special member")


class _Grouper:
    """Turns the member stream into numbered entries: samples (consecutive regular members sharing a key, with an
    image) and skips (members that are not regular files, names that are not UTF-8, a second image of a sample,
    a key seen before in the shard). Holds one sample and the hashes of the keys seen, nothing else."""

    def __init__(self, shard: Path) -> None:
        self.shard = shard
        self.group: _Group | None = None
        self.seen: set[int] = set()  # hashes of the keys of the samples so far (8 bytes each, not the keys)

    def entries(self, tf: tarfile.TarFile) -> Iterator[_Entry]:
        for member in _members(tf):
            yield from self._take(member)
        yield from self._close()

    def _take(self, member: tarfile.TarInfo) -> Iterator[_Entry]:
        if member.isdir():
            return
        if name_problem(member.name) is not None:
            key = _split(display_path(member.name))[0]
            yield _Skip(address(self.shard, key), "member name is not valid UTF-8")
            return
        if not member.isfile():
            yield _Skip(address(self.shard, member.name), f"not a regular member ({_member_kind(member)})")
            return
        key, ext = _split(member.name)
        if self.group is not None and self.group.key != key:
            yield from self._close()
        group = self.group = self.group or _Group(key)
        if ext in SUPPORTED_EXTENSIONS:
            if group.image is not None:
                reason = f"second image of sample {key}: only {group.image.name} is read"
                yield _Skip(address(self.shard, member.name), reason)
            else:
                group.image = member
        elif ext in _CAPTION_EXTS and group.caption is None:
            group.caption = member
        elif ext in _JSON_EXTS and group.json is None:
            group.json = member

    def _close(self) -> Iterator[_Entry]:
        group, self.group = self.group, None
        if group is None or group.image is None:
            return  # captions or metadata without an image: not a sample
        if hash(group.key) in self.seen:
            reason = f"duplicate key {group.key}: an earlier sample of the shard has it; this one is skipped"
            yield _Skip(address(self.shard, group.image.name), reason)
            return
        self.seen.add(hash(group.key))
        yield group


def _text(tf: tarfile.TarFile, member: tarfile.TarInfo | None) -> str | None:
    if member is None or member.size > _MAX_SIDECAR_BYTES:
        return None
    handle = tf.extractfile(member)
    return None if handle is None else handle.read().decode("utf-8", errors="replace").strip()


@contextlib.contextmanager
def open_shard(shard: Path) -> Iterator[tarfile.TarFile]:
    """The shard opened for reading, after checking what it is: ShardError (with the reason) for a name that is
    not UTF-8, a compressed shard, or anything but a regular file. The file is checked before it is opened and
    again (fstat) once opened non-blocking, so a FIFO named ``*.tar`` is never waited on."""
    if name_problem(shard) is not None:
        raise ShardError("the shard's name is not valid UTF-8")
    if is_compressed(shard):
        raise ShardError("compressed shard: only uncompressed .tar shards are read (decompress it first)")
    _check_regular(os.stat(shard).st_mode)
    fd = os.open(shard, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        _check_regular(os.fstat(fd).st_mode)  # replaced since the stat
        os.set_blocking(fd, True)
        with tarfile.open(fileobj=fh, mode="r:") as tf:
            yield tf


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ShardError(f"not a regular file ({special_kind(mode)})")


class ShardError(Exception):
    """A shard that is not read at all; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def iter_samples(
    shard: Path, limits: DecodeLimits, start: int = 0, stop: int | None = None
) -> Generator[Sample | Failure, None, None]:
    """Entries numbered ``start`` to ``stop`` (samples with an image, and skipped members, counted from 0), as
    Samples or Failures.

    A member too large, unreadable or cut short, not a regular file, with a name that is not UTF-8, or a key seen
    earlier in the shard is a Failure naming ``SHARD#KEY`` (or ``SHARD#MEMBER``); a shard that is no tar at all,
    is cut short, or is no regular file yields one Failure for the shard and stops (the samples before a cut are
    kept)."""
    number = -1
    try:
        with open_shard(shard) as tf:
            for entry in _Grouper(shard).entries(tf):
                number += 1
                if number < start:
                    continue
                if stop is not None and number >= stop:
                    return
                yield _read(tf, shard, entry, limits)
    except ShardError as exc:
        yield Failure(Path(display_path(shard)), exc.reason)
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f"after sample {number}" if number >= 0 else "at its start"
        yield Failure(shard, f"unreadable shard {where}: {_tar_reason(exc)}")


def _read(tf: tarfile.TarFile, shard: Path, entry: _Entry, limits: DecodeLimits) -> Sample | Failure:
    if isinstance(entry, _Skip):
        return Failure(Path(entry.where), entry.reason)
    image = entry.image
    assert image is not None  # a _Group is yielded only with its image
    where = Path(address(shard, entry.key))
    if image.size > limits.max_file_bytes:
        return Failure(where, f"file too large: {image.size} bytes exceeds max_file_bytes {limits.max_file_bytes}")
    try:
        handle = tf.extractfile(image)
        data = handle.read() if handle is not None else b""
        caption, meta = _text(tf, entry.caption), _text(tf, entry.json)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return Failure(where, f"truncated shard member: {_tar_reason(exc)}")
    if len(data) != image.size:
        return Failure(where, "truncated shard member")
    return Sample(entry.key, image.name, data, caption, meta)


def _tar_reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def count_samples(shard: Path) -> int:
    """How many entries (samples with an image, and skipped members) the shard holds, reading headers only; 1 for
    a shard that is not read at all (its one Failure), 0 when it cannot be opened."""
    count = 0
    try:
        with open_shard(shard) as tf:
            count = sum(1 for _ in _Grouper(shard).entries(tf))
    except ShardError:
        return 1
    except (tarfile.TarError, OSError, EOFError):
        pass  # iter_samples reports why
    return count


def read_member(shard: Path, key: str, limits: DecodeLimits) -> bytes:
    """The bytes of the image of sample ``key`` (`indexer serve` sends them): DecodeError with the reason when the
    shard or the sample cannot be read, or the member is larger than ``max_file_bytes``."""
    try:
        with open_shard(shard) as tf:
            for entry in _Grouper(shard).entries(tf):
                if isinstance(entry, _Group) and entry.key == key:
                    sample = _read(tf, shard, entry, limits)
                    if isinstance(sample, Failure):
                        raise DecodeError(Path(address(shard, key)), sample.reason)
                    return sample.data
    except ShardError as exc:
        raise DecodeError(shard, exc.reason) from None
    except FileNotFoundError:
        raise DecodeError(shard, "the shard is no longer on disk") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DecodeError(shard, f"unreadable shard: {_tar_reason(exc)}") from None
    raise DecodeError(Path(address(shard, key)), "the sample is no longer in the shard")
