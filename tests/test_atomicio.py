"""The atomic-write helper, on the real filesystem: all or nothing under the final name, temp files cleaned up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.atomicio import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    create_json_exclusive,
    is_temp_name,
    publish_new,
    temp_name,
)


def test_writes_replace_the_target_and_leave_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    atomic_write_json(target, {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]} and target.read_text() == '{"a":[1,2]}'
    atomic_write_bytes(tmp_path / "raw.bin", b"\x00\x01", durable=False)
    with atomic_open(tmp_path / "rows.csv", "w", newline="") as fh:
        fh.write("a,b\r\n")
    assert (tmp_path / "raw.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "rows.csv").read_bytes() == b"a,b\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "raw.bin", "rows.csv"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "page.html"
    target.write_text("old page")
    with pytest.raises(RuntimeError, match="half way"), atomic_path(target) as partial:
        partial.write_text("half a new page")
        raise RuntimeError("half way")
    assert target.read_text() == "old page" and [p.name for p in tmp_path.iterdir()] == ["page.html"]


def test_temp_names_are_hidden_unique_and_recognised(tmp_path: Path) -> None:
    first, second = temp_name(tmp_path / "x.parquet"), temp_name(tmp_path / "x.parquet")
    assert first != second and first.parent == tmp_path
    assert is_temp_name(first.name) and not is_temp_name("x.parquet")


def test_publish_new_and_create_exclusive_never_replace(tmp_path: Path) -> None:
    partial, target = tmp_path / ".t.tmp", tmp_path / "t"
    partial.write_text("new")
    target.write_text("existing")
    with pytest.raises(FileExistsError):
        publish_new(partial, target)
    assert target.read_text() == "existing"
    assert create_json_exclusive(tmp_path / "store.json", {"v": 1}) is True
    assert create_json_exclusive(tmp_path / "store.json", {"v": 2}) is False
    assert json.loads((tmp_path / "store.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t.tmp", "store.json", "t"]
