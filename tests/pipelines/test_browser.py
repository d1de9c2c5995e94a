"""The published pages as a reader's browser shows them: Debian's Chromium, headless, offline (file:// URLs), a
1,400 px wide window, every report in reports/ and the index.

A page fails on sideways scrolling (the document wider than the window), on any request that is not file: or data:
(the request is blocked and recorded), on progress-bar or traceback text anywhere in it, and a report (NN_name.html)
fails without its "what we found" box (``section.what-we-found``) and a figure both starting in the first screen.
Chromium is driven by Playwright's Python package (pinned in the dev extra) with the system browser; it is not
optional: without /usr/bin/chromium (or BSBR_CHROMIUM) every test here fails, saying what to install.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

REPORTS = ROOT / "reports"
PAGES = sorted(p.name for p in REPORTS.glob("[0-9][0-9]_*.html")) + ["index.html"]
WIDTH, FIRST_SCREEN = 1400, 900  # px: the window, and how far down "first screen" reaches
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Text a terminal shows and a page must not: tqdm bars and rates, and Python tracebacks.
TERMINAL_TEXT = ("it/s]", "s/it]", "%|", "█", "Traceback (most recent call last)")

#: What the page reports about itself once loaded (px are CSS pixels; top: from the top of the document).
_MEASURE = """() => {
  const box = document.querySelector('section.what-we-found');
  const visible = el => el.getClientRects().length > 0;
  const figures = [...document.images].filter(img => visible(img) && img.complete && img.naturalWidth > 0)
    .map(img => { const r = img.getBoundingClientRect(); return {top: r.top + scrollY, width: r.width, height: r.height}; });
  return {
    scrollWidth: document.documentElement.scrollWidth, scrollHeight: document.documentElement.scrollHeight,
    viewportWidth: document.documentElement.clientWidth,
    text: document.body.textContent,
    boxTop: box && visible(box) ? box.getBoundingClientRect().top + scrollY : null,
    figures: figures,
    links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
  };
}"""


def chromium_path() -> str:
    path = os.environ.get("BSBR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(f"Chromium is needed for the browser tests and {path} does not exist: install Debian's package "
                    "(`apt-get install -y chromium`, which .ci/run does) or point BSBR_CHROMIUM at a Chromium binary",
                    pytrace=False)
    return path


def look_at(paths: list[Path]) -> dict[str, dict]:
    """Each page's measurements (:data:`_MEASURE`) and the requests it made that are not file: or data: (blocked),
    by file name, from one headless Chromium session at WIDTH x FIRST_SCREEN px."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    result = {}
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": WIDTH, "height": FIRST_SCREEN})
        requests: list[str] = []

        def guard(route):  # nothing leaves the machine; what was asked for is recorded
            if route.request.url.startswith(("file:", "data:")):
                route.continue_()
            else:
                requests.append(route.request.url)
                route.abort()

        context.route("**/*", guard)
        page = context.new_page()
        page.on("request", lambda request: None if request.url.startswith(("file:", "data:"))
                else requests.append(request.url))
        for path in paths:
            requests.clear()
            page.goto(path.resolve().as_uri(), wait_until="load")
            result[path.name] = {**page.evaluate(_MEASURE), "requests": sorted(set(requests))}
        context.close()
    return result


@pytest.fixture(scope="module")
def seen() -> dict[str, dict]:
    return look_at([REPORTS / name for name in PAGES])


def test_the_browser_sees_what_the_checks_look_for(tmp_path):
    """The checks are not vacuous: a wide page, a remote image and script, a progress bar and a box low down."""
    page = tmp_path / "bad.html"
    page.write_text("<html><head><script src='https://cdn.example.invalid/require.js'></script></head><body>"
                    "<div style='width: 3000px; height: 1200px'>steps:  50%|#####     | 5/10 [00:01<00:01, 4.0it/s]</div>"
                    "<section class='what-we-found'>late</section>"
                    "<img src='http://example.invalid/figure.png'></body></html>")
    good = tmp_path / "good.html"
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
    good.write_text(f"<html><body><section class='what-we-found'>found</section>"
                    f"<img src='data:image/png;base64,{png}' style='width: 400px; height: 300px'></body></html>")
    bad_seen, good_seen = look_at([page, good]).values()
    assert bad_seen["scrollWidth"] >= 3000 and bad_seen["viewportWidth"] == WIDTH
    assert bad_seen["requests"] == ["http://example.invalid/figure.png", "https://cdn.example.invalid/require.js"]
    assert [t for t in TERMINAL_TEXT if t in bad_seen["text"]] == ["it/s]", "%|"]
    assert bad_seen["boxTop"] >= 1200 and bad_seen["figures"] == []
    assert good_seen["requests"] == [] and good_seen["scrollWidth"] == WIDTH
    assert good_seen["boxTop"] < FIRST_SCREEN
    assert [(f["width"], f["height"]) for f in good_seen["figures"]] == [(400, 300)]


def test_every_report_is_checked():
    assert PAGES[-1] == "index.html" and len(PAGES) >= 8
    assert [p for p in PAGES if p != "index.html"] == sorted(f"{p.stem}.html" for p in (ROOT / "notebooks").glob(
        "[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("name", PAGES)
def test_no_sideways_scroll(seen, name):
    page = seen[name]
    assert page["viewportWidth"] == WIDTH
    assert page["scrollWidth"] <= WIDTH, f"{name} is {page['scrollWidth']} px wide in a {WIDTH} px window"


@pytest.mark.parametrize("name", PAGES)
def test_no_network_requests(seen, name):
    assert seen[name]["requests"] == []


@pytest.mark.parametrize("name", PAGES)
def test_no_terminal_text(seen, name):
    text = seen[name]["text"]
    assert [t for t in TERMINAL_TEXT if t in text] == []
    assert len(text) > 500  # the page has content (the text checked is the page's, not an error page)


@pytest.mark.parametrize("name", [p for p in PAGES if p != "index.html"])
def test_report_opens_with_what_we_found_and_a_figure(seen, name):
    page = seen[name]
    assert page["boxTop"] is not None, f"{name} has no 'what we found' box (section.what-we-found)"
    assert page["boxTop"] < FIRST_SCREEN, f"{name}'s 'what we found' box starts at {page['boxTop']:.0f} px"
    first_screen = [f for f in page["figures"] if f["top"] < FIRST_SCREEN and f["width"] >= 300]
    assert first_screen, f"{name} shows no figure (≥ 300 px wide) in its first {FIRST_SCREEN} px: {page['figures']}"


def test_index_links_every_report_and_fits_one_screen_width(seen):
    index = seen["index.html"]
    reports = [p for p in PAGES if p != "index.html"]
    assert sorted({link for link in index["links"] if link in reports}) == reports
    figures = [f for f in index["figures"] if f["top"] < FIRST_SCREEN and f["width"] >= 300]
    assert figures, "the index shows its summary figure in the first screen"
