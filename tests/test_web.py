"""The web page in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright; no browser download),
against the real service over a store of shapes indexed with the learned test model. Saves a screenshot to
a temporary folder (docs/web-search.png with INDEXER_DOCS_SCREENSHOTS=1)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from indexer.api.routes import create_app
from tests.fixtures.shapes import write_dataset
from tests.support.live_server import Corpus, class_of, make_corpus, serve
from tests.support.screens import screenshot_path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# The browser's own log line for the 422 that test_errors_are_shown_not_thrown provokes on purpose.
EXPECTED = "the server responded with a status of 422"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Corpus]]:
    corpus = make_corpus(tmp_path_factory.mktemp("web"), archive=0)
    with serve(create_app(corpus.settings, corpus.store, corpus.model)) as url:
        yield url, corpus
    corpus.store.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield context
        context.close()


@contextmanager
def guarded_page(browser: Any, url: str) -> Iterator[Any]:
    """A fresh page at url; fails the test if it logs an error or asks for anything outside the service."""
    outside: list[str] = []
    errors: list[str] = []
    page = browser.new_page()

    def guard(route: Any) -> None:
        if route.request.url.startswith((url, "blob:", "data:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    def console(msg: Any) -> None:
        if msg.type == "error" and EXPECTED not in msg.text:
            errors.append(msg.text)

    page.route("**/*", guard)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", console)
    page.goto(url)
    yield page
    page.close()
    assert outside == [], f"the page asked for outside resources: {outside}"
    assert errors == [], f"the page logged errors: {errors}"


@pytest.fixture
def page(browser: Any, site: tuple[str, Corpus]) -> Iterator[Any]:
    with guarded_page(browser, site[0]) as opened:
        yield opened


def grid(page: Any, count: int) -> list[dict[str, str]]:
    """The first `count` results once their thumbnails have loaded: [{id, path, score}]."""
    page.wait_for_function(
        "n => { const imgs = [...document.querySelectorAll('#grid li.hit img')];"
        " return imgs.length >= n && imgs.slice(0, n).every(i => i.complete && i.naturalWidth > 0); }",
        arg=count,
        timeout=30_000,
    )
    items: list[dict[str, str]] = page.eval_on_selector_all(
        "#grid li.hit", "els => els.map(e => ({id: e.dataset.id, path: e.dataset.path, score: e.dataset.score}))"
    )
    return items[:count]


def search_for(page: Any, text: str, exclude: str = "") -> None:
    page.fill("#exclude", exclude)
    page.fill("#q", text)
    page.press("#q", "Enter")
    page.wait_for_function("() => !document.querySelector('#status').textContent.startsWith('Searching')")


def test_typing_a_red_circle_shows_red_circles_first(page: Any, tmp_path: Path) -> None:
    search_for(page, "a red circle")
    hits = grid(page, 4)
    assert [class_of(h["path"]) for h in hits] == ["red-circle"] * 4
    scores = [float(h["score"]) for h in hits]
    assert scores == sorted(scores, reverse=True)
    shown = page.inner_text("#grid li.hit:first-child .score")
    assert shown == f"{scores[0]:.3f}"
    page.set_viewport_size({"width": 1200, "height": 800})
    shot = screenshot_path("web-search.png", tmp_path)
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000


def test_clicking_a_result_shows_more_like_it(page: Any) -> None:
    search_for(page, "a green square")
    first = grid(page, 1)[0]
    page.click("#grid li.hit:first-child > button")
    page.wait_for_function("id => document.querySelector('#grid li.hit')?.dataset.id === id", arg=first["id"])
    similar = grid(page, 4)
    assert similar[0]["id"] == first["id"] and float(similar[0]["score"]) > 0.99
    assert all(class_of(h["path"]) == "green-square" for h in similar)
    assert "Like:" in page.inner_text("#examples") and page.input_value("#q") == ""


def test_excluding_red_keeps_circles_of_other_colours(page: Any) -> None:
    search_for(page, "a red circle", exclude="red")
    for hit in grid(page, 4):
        color, shape = class_of(hit["path"]).split("-")
        assert shape == "circle" and color != "red"


def test_picking_an_image_searches_by_it(page: Any, tmp_path: Path) -> None:
    probe = next(p for p in write_dataset(tmp_path, 12, seed=7) if p.name.startswith("blue-triangle"))
    page.set_input_files("#file", str(probe))
    page.wait_for_function("() => document.querySelector('#examples').textContent.includes('Image:')")
    hits = grid(page, 4)
    assert all(class_of(h["path"]) == "blue-triangle" for h in hits)


def test_dropping_an_image_searches_by_it(page: Any, tmp_path: Path) -> None:
    probe = next(p for p in write_dataset(tmp_path, 12, seed=8) if p.name.startswith("yellow-circle"))
    data = list(probe.read_bytes())
    page.evaluate(
        """bytes => {
            const file = new File([new Uint8Array(bytes)], "drop.png", {type: "image/png"});
            const transfer = new DataTransfer();
            transfer.items.add(file);
            const drop = new DragEvent("drop", {dataTransfer: transfer, bubbles: true});
            document.querySelector("#drop").dispatchEvent(drop);
        }""",
        data,
    )
    hits = grid(page, 4)
    assert all(class_of(h["path"]) == "yellow-circle" for h in hits)


def test_errors_are_shown_not_thrown(page: Any) -> None:
    page.click("summary")
    page.fill("#f-min-width", "-5")
    search_for(page, "a red circle")
    page.wait_for_selector("#status.error")
    assert "min_width" in page.inner_text("#status")
    assert page.eval_on_selector_all("#grid li", "els => els.length") == 0
