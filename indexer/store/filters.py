"""`SearchFilter` → backend-neutral conditions (all must hold), which each backend translates to its own filter:

path_prefix        "dirs" (every ancestor directory of the file) contains the prefix, or "path" is it
formats            "format" is one of them (upper-cased; JPG/TIF/HEIC also match JPEG/TIFF/HEIF)
min_width/height   "width"/"height" >= the value
mtime_from/to      "mtime" within [from, to]
cluster            "cluster" equals it
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from indexer import formats as image_formats
from indexer.records import SearchFilter


@dataclass(frozen=True, slots=True)
class _Match:
    key: str
    value: str | int


@dataclass(frozen=True, slots=True)
class _AnyOf:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Range:
    key: str
    gte: float | None = None
    lte: float | None = None


@dataclass(frozen=True, slots=True)
class _Either:
    options: tuple[_Match, ...]


_Cond = _Match | _AnyOf | _Range | _Either


def filter_conditions(flt: SearchFilter | None) -> list[_Cond]:
    """Translate a SearchFilter into backend-neutral conditions, all of which must hold."""
    if flt is None:
        return []
    conds: list[_Cond | None] = [
        _prefix_condition(flt.path_prefix),
        _AnyOf("format", normalise_formats(flt.formats)) if flt.formats else None,
        _Range("width", gte=flt.min_width) if flt.min_width is not None else None,
        _Range("height", gte=flt.min_height) if flt.min_height is not None else None,
        _mtime_condition(flt.mtime_from, flt.mtime_to),
        _Match("cluster", flt.cluster) if flt.cluster is not None else None,
    ]
    return [c for c in conds if c is not None]


def _prefix_condition(prefix: str | None) -> _Cond | None:
    """A directory prefix matches via the "dirs" list; a file path via "path"; "/" matches everything."""
    if prefix is None:
        return None
    norm = prefix.rstrip("/" + os.sep)
    if not norm:
        return None
    return _Either((_Match("dirs", norm), _Match("path", norm)))


def _mtime_condition(start: float | None, end: float | None) -> _Cond | None:
    if start is None and end is None:
        return None
    return _Range("mtime", gte=start, lte=end)


def normalise_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Upper-case format names (leading dots dropped), with the common aliases' canonical names added."""
    names: list[str] = []
    for fmt in formats:
        name = fmt.strip().lstrip(".").upper()
        names.extend(n for n in (name, image_formats.ALIASES.get(name)) if n and n not in names)
    return tuple(names)
