"""The fault suite, duplicate actions (issue 22, defects 1, 3, 4 and 13; issue 19's moved copies), through the
real `indexer dedup` on real files and symbolic links.

A small library: ``photos/orig`` (3 shapes) and ``photos/copies`` (byte copies, newer: the originals are the
keepers), indexed with the learned test model. Each test changes the disk the way an attacker or an accident
would, then runs the command and checks what is left on disk and in the store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from indexer.ingest.pipeline import run_index
from indexer.library.actions import apply_plan, plan_actions
from indexer.library.dedup import find_duplicates
from indexer.model.lazy import LazyModel
from indexer.store.edge_store import EdgeStore
from tests.conftest import shapes_settings
from tests.fixtures.shapes import write_dataset
from tests.support.clirun import run

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

T0 = 1_700_000_000


def photos(tmp_path: Path, model: LazyModel, extra: int = 0) -> tuple[Path, Path]:
    """photos/orig (3 images, older) and photos/copies (their byte copies, newer), indexed: (photos, store)."""
    root = tmp_path / "photos"
    for i, path in enumerate(write_dataset(root / "orig", 3 + extra, seed=31, size=64)):
        os.utime(path, (T0 + i, T0 + i))
        if i < 3:
            copy = root / "copies" / path.name
            copy.parent.mkdir(exist_ok=True)
            shutil.copyfile(path, copy)
            os.utime(copy, (T0 + 1000, T0 + 1000))
    settings = shapes_settings(tmp_path / "store")
    with EdgeStore(tmp_path / "store") as store:
        assert run_index([root], settings, store, model).indexed == 6 + extra
    return root, tmp_path / "store"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def stored_paths(store: Path) -> set[str]:
    with EdgeStore(store) as s:
        return {p.path for p in s.scroll()}


def dedup(store: Path, *args: str, check: int = 0, env: dict[str, str] | None = None) -> str:
    proc = run("dedup", "--tier", "exact", "--store", str(store), *args, check=check, env=env)
    assert "Traceback" not in proc.stderr
    return proc.stdout + proc.stderr


# --- defect 1: a folder swapped for a symlink ----------------------------------------------------------------------


def test_a_folder_swapped_for_a_symlink_is_never_acted_through(tmp_path: Path, model: LazyModel) -> None:
    root, store = photos(tmp_path, model)
    victim = tmp_path / "victim"
    shutil.copytree(root / "copies", victim, copy_function=shutil.copy2)  # cp -p: same sizes and mtimes
    (root / "copies").rename(root / "copies.real")
    (root / "copies").symlink_to(victim)
    before = snapshot(victim)
    out = dedup(store, "--delete", "--yes", check=1)
    assert snapshot(victim) == before
    assert out.count(f"now leads to {victim}") == 3 and "deleted 0 files" in out
    out = dedup(store, "--move-to", str(tmp_path / "dups"), check=1)
    assert snapshot(victim) == before and not (tmp_path / "dups").exists()
    assert len(stored_paths(store)) == 6


def test_a_swap_between_the_plan_and_the_action_is_caught_when_acting(tmp_path: Path, model: LazyModel) -> None:
    root, store_dir = photos(tmp_path, model)
    victim = tmp_path / "victim"
    shutil.copytree(root / "copies", victim, copy_function=shutil.copy2)
    with EdgeStore(store_dir) as store:
        plan = plan_actions(find_duplicates(store, "exact"), delete=True)
        assert len(plan.actions) == 3  # planned while the folder was the real one
        (root / "copies").rename(root / "copies.real")
        (root / "copies").symlink_to(victim)
        apply_plan(plan, store)
    assert plan.done == [] and all("now leads to" in f.reason for f in plan.failed)
    assert len(list(victim.iterdir())) == 3 and len(list((root / "copies.real").iterdir())) == 3


# --- defect 3: content, not the label ------------------------------------------------------------------------------


def _same_size_same_mtime_other_bytes(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-20:] = bytes(255 - b for b in data[-20:])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_keeper_with_other_bytes_of_the_same_size_and_mtime_keeps_its_copy(tmp_path: Path, model: LazyModel) -> None:
    root, store = photos(tmp_path, model)
    keeper, member = sorted((root / "orig").iterdir())[0], sorted((root / "copies").iterdir())[0]
    _same_size_same_mtime_other_bytes(keeper)
    other_member = sorted((root / "copies").iterdir())[1]
    _same_size_same_mtime_other_bytes(other_member)
    out = dedup(store, "--delete", "--yes", check=1)
    assert member.exists(), "the only real copy was deleted"
    assert f"skipping {member}: its keeper {keeper} no longer holds what was indexed (sha256 differs)" in out
    assert other_member.exists() and f"skipping {other_member}: its content is not what was indexed" in out
    assert sorted(p.name for p in (root / "copies").iterdir()) == sorted([member.name, other_member.name])


# --- issue 19 and defect 13: moved copies leave the index; a second run nests nothing ------------------------------


def test_moved_copies_leave_the_index_and_a_second_run_finds_nothing(tmp_path: Path, model: LazyModel) -> None:
    root, store = photos(tmp_path, model)
    dups = tmp_path / "dups"
    out = dedup(store, "--move-to", str(dups))
    assert sorted(snapshot(dups)) == [f"copies/{p.name}" for p in sorted((root / "orig").iterdir())]
    assert stored_paths(store) == {str(p) for p in (root / "orig").iterdir()}
    again = json.loads(dedup(store, "--json"))
    assert again["groups"] == [] and again["scanned"] == 3
    third = dedup(store, "--move-to", str(dups))
    assert sorted(snapshot(dups)) == [f"copies/{p.name}" for p in sorted((root / "orig").iterdir())]
    assert "not under an indexed folder: the moved files leave the index" in out and "moved 3 files" in out
    assert "dry run: move 0 files" in third


def test_a_second_move_into_an_indexed_folder_nests_nothing(tmp_path: Path, model: LazyModel) -> None:
    root, store = photos(tmp_path, model)
    dups, env = root / "dups", {"INDEXER_WATCH__PATHS": json.dumps([str(root)])}
    out = dedup(store, "--move-to", str(dups), env=env)
    moved = sorted(snapshot(dups))
    assert len(moved) == 3 and {str(dups / m) for m in moved} <= stored_paths(store)
    second = dedup(store, "--move-to", str(dups), env=env)
    assert sorted(snapshot(dups)) == moved, "the second run moved the moved copies again, deeper"
    assert "under an indexed folder: the moved files stay in the index" in out
    assert "dry run: move 0 files" in second and second.count("(moved there before): left alone") == 3


# --- defect 13: a symlinked keeper ---------------------------------------------------------------------------------


def test_a_symlinked_keeper_is_named_as_such(tmp_path: Path, model: LazyModel) -> None:
    lib = tmp_path / "lib"
    (real,) = write_dataset(lib, 1, seed=5, size=64)
    link = lib / "a-link.png"  # sorts first: the keeper of the pair
    link.symlink_to(real.name)
    with EdgeStore(tmp_path / "store") as store:
        assert run_index([lib], shapes_settings(tmp_path / "store"), store, model).indexed == 2
    out = dedup(tmp_path / "store", "--delete", "--yes")
    assert f"leave {real}: its keeper {link} is a symbolic link to this file: left alone" in out
    assert "hard link" not in out and real.exists() and link.exists()


# --- defect 4 on the command line: a link below the target folder -------------------------------------------------


def test_a_link_below_the_move_target_is_never_followed(tmp_path: Path, model: LazyModel) -> None:
    root, store = photos(tmp_path, model)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "dups").mkdir()
    (tmp_path / "dups" / "copies").symlink_to(outside)
    out = dedup(store, "--move-to", str(tmp_path / "dups"), check=2)
    assert f"{tmp_path / 'dups' / 'copies'} is a symbolic link: moves never follow links" in out
    assert list(outside.iterdir()) == [] and len(list((root / "copies").iterdir())) == 3
