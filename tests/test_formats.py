"""The one table of image formats, and the places that used to keep their own copies of it."""

from __future__ import annotations

from indexer import formats
from indexer.decode import image as decode
from indexer.store.filters import normalise_formats


def test_every_extension_maps_to_a_format_with_a_media_type() -> None:
    assert set(formats.EXTENSIONS.values()) == set(formats.FORMATS) == set(formats.MEDIA_TYPES)
    assert formats.format_of_path("/a/b/photo.JPE") == "JPEG" and formats.format_of_path("x.heic") == "HEIF"
    assert formats.format_of_path("scan.xyz") == "XYZ"  # unknown: upper-cased, as before


def test_aliases_resolve_and_filters_match_both_names() -> None:
    assert [formats.canonical_format(n) for n in ("jpg", ".jpe", "tif", "heic", "png")] == [
        "JPEG",
        "JPEG",
        "TIFF",
        "HEIF",
        "PNG",
    ]
    assert normalise_formats(["jpe"]) == ("JPE", "JPEG") and normalise_formats(["PNG"]) == ("PNG",)


def test_decode_reads_exactly_the_table() -> None:
    assert decode.SUPPORTED_EXTENSIONS == formats.SUPPORTED_EXTENSIONS
    assert decode._FORMATS == formats.FORMATS
