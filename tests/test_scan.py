"""Scan: recursive, extension filter, hidden files, symlink loops, unreadable entries reported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from indexer.records import Failure
from indexer.sources.scan import scan

EXT = frozenset({".jpg", ".png"})


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def names(root: Path, **kw: object) -> list[str]:
    return sorted(str(e.path.relative_to(root)) for e in scan([root], EXT, **kw))  # type: ignore[arg-type]


def test_recursive_with_extension_filter(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "sub" / "b.PNG")
    touch(tmp_path / "sub" / "deeper" / "c.png")
    touch(tmp_path / "notes.txt")
    assert names(tmp_path) == ["a.jpg", "sub/b.PNG", "sub/deeper/c.png"]


def test_entries_carry_size_and_mtime(tmp_path: Path) -> None:
    f = touch(tmp_path / "a.jpg", b"12345")
    (entry,) = scan([tmp_path], EXT)
    assert entry.path == f and entry.size == 5 and entry.mtime_ns == f.stat().st_mtime_ns


def test_hidden_files_and_dirs_skipped_by_default(tmp_path: Path) -> None:
    touch(tmp_path / ".hidden.jpg")
    touch(tmp_path / ".thumbs" / "t.jpg")
    touch(tmp_path / "v.jpg")
    assert names(tmp_path) == ["v.jpg"]
    assert names(tmp_path, include_hidden=True) == [".hidden.jpg", ".thumbs/t.jpg", "v.jpg"]


def test_symlink_loop_is_walked_once(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "x.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert names(tmp_path) == ["a/x.jpg"]


def test_symlinked_dir_followed_or_not(tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch(tmp_path / "elsewhere" / "y.jpg")
    root.mkdir()
    os.symlink(tmp_path / "elsewhere", root / "link")
    assert names(root) == ["link/y.jpg"]
    assert names(root, follow_symlinks=False) == []


def test_dangling_symlink_reported_not_fatal(tmp_path: Path) -> None:
    touch(tmp_path / "ok.jpg")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "dangling.jpg")
    errors: list[Failure] = []
    found = [e.path.name for e in scan([tmp_path], EXT, on_error=errors.append)]
    assert found == ["ok.jpg"]
    assert [e.path.name for e in errors] == ["dangling.jpg"] and "cannot stat" in errors[0].reason


def test_file_root_and_overlapping_roots(tmp_path: Path) -> None:
    f = touch(tmp_path / "d" / "a.jpg")
    assert [e.path for e in scan([f], EXT)] == [f]
    assert [e.path for e in scan([tmp_path, tmp_path / "d"], EXT)] == [f]


def test_relative_root_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "a.jpg")
    monkeypatch.chdir(tmp_path)
    (entry,) = scan([Path(".")], EXT)
    assert entry.path.is_absolute() and entry.path == tmp_path / "a.jpg"
