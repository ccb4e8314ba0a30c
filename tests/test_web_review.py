"""The Duplicates and Clusters views in a real headless Chromium (as tests/test_web.py), against the real service
over the dedup tests' library of planted exact and near duplicates, indexed with the learned test model. Saves
web-duplicates.png and web-clusters.png to a temporary folder (to docs/ with INDEXER_DOCS_SCREENSHOTS=1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from indexer.api.routes import create_app
from indexer.ingest.pipeline import run_index
from indexer.model.lazy import LazyModel
from indexer.store.edge_store import EdgeStore
from tests.conftest import shapes_settings
from tests.support.library import snapshot, write_library
from tests.support.live_server import serve
from tests.support.screens import screenshot_path
from tests.test_web import CHROMIUM, browser, guarded_page  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")

Site = tuple[Any, dict[str, Path], EdgeStore, Path]


@pytest.fixture
def site(tmp_path: Path, model: LazyModel, browser: Any) -> Iterator[Site]:  # noqa: F811
    """A library of its own per test (the tests move and delete files), served, and a page open on it."""
    yield from _site(tmp_path, model, browser, {})


@pytest.fixture
def site_with_duplicates_dir(tmp_path: Path, model: LazyModel, browser: Any) -> Iterator[Site]:  # noqa: F811
    """The same, the service having a duplicates folder (dedup.duplicates_dir: tmp/dupes) and no other root."""
    dedup = {"duplicates_dir": str(tmp_path / "dupes")}
    yield from _site(tmp_path, model, browser, {"dedup": dedup, "serve": {"thumbnail_dir": str(tmp_path / "t")}})


def _site(tmp_path: Path, model: LazyModel, browser: Any, overrides: dict[str, Any]) -> Iterator[Site]:  # noqa: F811
    files = write_library(tmp_path / "lib")
    serve_settings = {"roots": [str(tmp_path)], "thumbnail_dir": str(tmp_path / "t")}
    settings = shapes_settings(tmp_path / "store", **{"serve": serve_settings, **overrides})
    store = EdgeStore(tmp_path / "store")
    try:
        assert run_index([tmp_path / "lib"], settings, store, model).indexed == len(files)
        with serve(create_app(settings, store, model, api_key="")) as url, guarded_page(browser, url) as page:
            yield page, files, store, tmp_path
    finally:
        store.close()


def find_duplicates(page: Any, tier: str) -> None:
    page.click("#views button[data-view=duplicates]")
    page.select_option("#dup-tier", tier)
    page.click("#dup-find")
    page.wait_for_selector("#dup-groups li.group")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#dup-groups .picture img')].every(i => i.complete && i.naturalWidth > 0)"
    )


def group_selector(page: Any, keeper: Path) -> str:
    index = page.eval_on_selector(
        f"#dup-groups li.member.keeper[data-path='{keeper}']", "el => el.closest('li.group').dataset.index"
    )
    return f"#dup-groups li.group[data-index='{index}']"


def test_review_near_duplicates_change_the_keeper_and_move_the_others(site: Site) -> None:
    page, files, store, tmp = site
    find_duplicates(page, "near")
    assert page.eval_on_selector_all("#dup-groups li.group", "els => els.length") == 3
    assert "3 groups" in page.inner_text("#dup-status")
    red = group_selector(page, files["red-circle"])
    assert page.inner_text(f"{red} li.member.keeper .score") == "suggested keeper"
    page.set_viewport_size({"width": 1200, "height": 900})
    page.screenshot(path=str(screenshot_path("web-duplicates.png", tmp)))
    page.set_viewport_size({"width": 390, "height": 800})  # a phone: nothing wider than the screen
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390

    small = f"{red} li.member[data-path='{files['red-small']}']"
    tint = f"{red} li.member[data-path='{files['red-tint']}']"
    page.check(f"{small} .keep input")  # the resized copy becomes the keeper
    assert page.get_attribute(small, "class") == "member keeper"
    assert page.is_disabled(f"{small} .act input")
    page.uncheck(f"{tint} .act input")  # and the tinted one stays
    page.fill("#dup-move-to", str(tmp / "dupes"))
    before = snapshot(tmp / "lib")
    page.click(f"{red} .group-move")
    page.wait_for_selector("#plan-dialog[open]")
    assert "Dry run: move 3 files" in page.inner_text("#plan-title")
    assert snapshot(tmp / "lib") == before  # the dry run moved nothing
    page.click("#plan-apply")
    page.wait_for_function("() => document.querySelector('#dup-status').textContent.startsWith('moved')")
    assert page.inner_text("#dup-status").startswith("moved 3 files, 0 failed")
    lib, dupes = tmp / "lib", tmp / "dupes"
    for name in ("red-circle", "red-crop", "red-lowq"):
        assert not files[name].exists()
        assert (dupes / files[name].relative_to(lib)).read_bytes() == before[str(files[name])]
    assert files["red-small"].exists() and files["red-tint"].exists()
    paths = {p.path for p in store.scroll()}
    assert str(dupes / "red-circle.png") in paths and str(files["red-circle"]) not in paths
    done = page.eval_on_selector_all(f"{red} li.member[data-done=true]", "els => els.map(e => e.dataset.path)")
    assert set(done) == {str(files[n]) for n in ("red-circle", "red-crop", "red-lowq")}


def test_a_delete_without_the_confirmation_does_nothing(site: Site) -> None:
    page, files, store, tmp = site
    find_duplicates(page, "exact")
    green = group_selector(page, files["green-square"])
    before = snapshot(tmp / "lib")
    page.click(f"{green} .group-delete")
    page.wait_for_selector("#plan-dialog[open]")
    assert page.is_disabled("#plan-apply")  # until "Yes, delete these files for good" is ticked
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.querySelector('#plan-dialog').open")
    # The dialog's close event sets the status a moment after the dialog closes.
    page.wait_for_function("() => document.querySelector('#dup-status').textContent === 'Nothing was changed.'")
    assert page.inner_text("#dup-status") == "Nothing was changed."
    page.click(f"{green} .group-delete")
    page.wait_for_selector("#plan-dialog[open]")
    page.click("#plan-cancel")
    assert snapshot(tmp / "lib") == before and str(files["green-copy"]) in {p.path for p in store.scroll()}

    page.click(f"{green} .group-delete")
    page.wait_for_selector("#plan-dialog[open]")
    page.check("#plan-confirm")
    page.click("#plan-apply")
    page.wait_for_function("() => document.querySelector('#dup-status').textContent.startsWith('deleted')")
    assert not files["green-copy"].exists() and files["green-square"].exists()
    assert str(files["green-copy"]) not in {p.path for p in store.scroll()}


def test_the_clusters_view_opens_a_cluster_search(site: Site) -> None:
    page, _, store, tmp = site
    page.click("#views button[data-view=clusters]")
    page.wait_for_function("() => document.querySelector('#cl-status').textContent.includes('No clusters yet')")
    page.fill("#cl-k", "4")
    page.click("#cl-run")
    page.wait_for_selector("#cl-rows li.cluster", timeout=60_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#cl-rows img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.eval_on_selector_all("#cl-rows li.cluster", "els => els.length") == 4
    page.set_viewport_size({"width": 1200, "height": 900})
    page.screenshot(path=str(screenshot_path("web-clusters.png", tmp)))
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390

    cluster = int(page.get_attribute("#cl-rows li.cluster:nth-child(2)", "data-id") or "-1")
    members = {p.path for p in store.scroll() if p.payload.get("cluster") == cluster}
    page.focus("#cl-rows li.cluster:nth-child(2) button")
    page.keyboard.press("Enter")
    page.wait_for_selector("#view-search:not([hidden]) #grid li.hit")
    page.wait_for_function("() => !document.querySelector('#status').textContent.startsWith('Searching')")
    shown = page.eval_on_selector_all("#grid li.hit", "els => els.map(e => e.dataset.path)")
    assert set(shown) == members
    assert f"In cluster {cluster}" in page.inner_text("#examples")


def test_a_move_with_the_folder_left_empty_goes_to_the_duplicates_dir(site_with_duplicates_dir: Site) -> None:
    page, files, store, tmp = site_with_duplicates_dir
    find_duplicates(page, "exact")
    green = group_selector(page, files["green-square"])
    assert page.input_value("#dup-move-to") == ""
    page.click(f"{green} .group-move")
    page.wait_for_selector("#plan-dialog[open]")
    assert "to the duplicates folder (dedup.duplicates_dir)" in page.inner_text("#plan-summary")
    assert str(tmp / "dupes" / "copies" / "green-square.png") in page.inner_text("#plan-list")
    page.click("#plan-apply")
    page.wait_for_function("() => document.querySelector('#dup-status').textContent.startsWith('moved')")
    assert not files["green-copy"].exists() and (tmp / "dupes" / "copies" / "green-square.png").exists()
    assert files["green-square"].exists()
    assert str(files["green-copy"]) not in {p.path for p in store.scroll()}  # moved out of the indexed folders
