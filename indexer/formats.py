"""Image formats, in one table: file extension → Pillow format → MIME type, and the aliases people type.

    FORMATS               every format the indexer reads, in the order Pillow should try them
    EXTENSIONS            ".jpe" → "JPEG", ...: which files are images, and the format their name implies
    SUPPORTED_EXTENSIONS  the keys of EXTENSIONS
    MEDIA_TYPES           "JPEG" → "image/jpeg", ...: what the HTTP API serves a stored image as
    ALIASES               "JPG" → "JPEG", ...: names a user may give for a format

`format_of_path` names the format of a file from its extension (what `indexer import` stores when the file
was embedded elsewhere); `canonical_format` turns a name a user typed into the stored one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath


@dataclass(frozen=True)
class ImageFormat:
    """One format: Pillow's name for it, its MIME type, its file extensions and other names for it."""

    name: str
    media_type: str
    extensions: tuple[str, ...]
    aliases: tuple[str, ...] = ()


# HEIF comes before AVIF so that pillow-heif, when present, gets "mif1" files first.
_TABLE = (
    ImageFormat("JPEG", "image/jpeg", (".jpg", ".jpeg", ".jpe"), ("JPG", "JPE")),
    ImageFormat("PNG", "image/png", (".png",)),
    ImageFormat("WEBP", "image/webp", (".webp",)),
    ImageFormat("GIF", "image/gif", (".gif",)),
    ImageFormat("BMP", "image/bmp", (".bmp",)),
    ImageFormat("TIFF", "image/tiff", (".tif", ".tiff"), ("TIF",)),
    ImageFormat("HEIF", "image/heif", (".heic", ".heif"), ("HEIC",)),
    ImageFormat("AVIF", "image/avif", (".avif",)),
)

FORMATS: tuple[str, ...] = tuple(f.name for f in _TABLE)
EXTENSIONS: dict[str, str] = {ext: f.name for f in _TABLE for ext in f.extensions}
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(EXTENSIONS)
MEDIA_TYPES: dict[str, str] = {f.name: f.media_type for f in _TABLE}
ALIASES: dict[str, str] = {alias: f.name for f in _TABLE for alias in f.aliases}


def canonical_format(name: str) -> str:
    """A format name as stored: upper-cased, leading dot dropped, aliases resolved ("jpg" → "JPEG")."""
    upper = name.strip().lstrip(".").upper()
    return ALIASES.get(upper, upper)


def format_of_path(path: str | PurePath) -> str:
    """The format a file's extension implies ("a.jpe" → "JPEG"); an unknown extension upper-cased."""
    suffix = PurePath(path).suffix.lower()
    return EXTENSIONS.get(suffix, canonical_format(suffix))
