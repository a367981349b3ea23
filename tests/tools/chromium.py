"""Headless Chromium for the report pages: render a page, list what it fetched from the network.

Debian's `chromium` package (`.ci/run` installs it). Each call uses a fresh profile folder and
writes a NetLog (`--log-net-log`); requests made by the page are the URL requests whose network
isolation key is the page's own site (`file://`); Chromium's own background traffic (component
updates, time checks) runs under other keys and is ignored.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

__all__ = ["Rendered", "render", "remote_references", "Layout", "layout", "overlap"]

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1100,2400",
)


@dataclass(frozen=True)
class Rendered:
    dom: str  # the DOM after loading (--dump-dom)
    page_requests: list[str]  # URLs the page asked the network for (not file:, data:)
    screenshot: Path | None


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    return found


def render(page: Path, work: Path, *, screenshot: bool = False) -> Rendered:
    """Load `page` in headless Chromium: its DOM, the network requests it made, a screenshot."""
    work.mkdir(parents=True, exist_ok=True)
    netlog = work / "netlog.json"
    command = [_chromium(), *FLAGS, f"--user-data-dir={work / 'profile'}",
               f"--log-net-log={netlog}", "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    requests = _page_requests(netlog)
    shot = None
    if screenshot:
        shot = work / "shot.png"
        subprocess.run([_chromium(), *FLAGS, f"--user-data-dir={work / 'profile2'}",
                        f"--screenshot={shot}", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120, check=True)
    return Rendered(done.stdout, requests, shot)


def _page_requests(netlog: Path) -> list[str]:
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] != start or "url" not in params:
            continue
        if "file://" in str(params.get("network_isolation_key", "")) and not re.match(
            r"(file|data|blob|about):", params["url"]
        ):
            urls.append(params["url"])
    return urls


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "srcset", "data", "action", "poster"):
                if value and re.match(r"\s*(https?:)?//", value):
                    self.found.append(f"<{tag} {name}={value}>")


def remote_references(html: str) -> list[str]:
    """src/href attributes and CSS url()/@import that point at http(s) or protocol-relative
    URLs (namespace declarations such as xmlns="http://www.w3.org/2000/svg" load nothing)."""
    parser = _References()
    parser.feed(html)
    css = re.findall(r"(?:url\(\s*['\"]?|@import\s+['\"]?)((?:https?:)?//[^)'\"\s]+)", html)
    return parser.found + css


# Run at the end of the page's body: boxes (left, top, right, bottom, in CSS pixels) of every
# text drawn in the plots (SVG <text>, with the plot's title and whether it is a tick label or
# in the legend), of the points (matplotlib's marker <use> elements), and of each table and its
# scrolling wrapper.
_MEASURE = """<script>
(() => {
  const box = (e) => {
    const r = e.getBoundingClientRect();
    return [r.left, r.top, r.right, r.bottom];
  };
  const all = (selector) => [...document.querySelectorAll(selector)];
  const out = {
    viewport: window.innerWidth, page: document.documentElement.scrollWidth,
    texts: all('figure.plot svg text').map(e => ({text: e.textContent, box: box(e),
      plot: e.closest('figure').getAttribute('aria-label'),
      tick: !!e.closest('g[id*="tick"]'), legend: !!e.closest('g[id*="legend"]')})),
    points: all('g[id*="PathCollection"] use').map(e => ({box: box(e),
      plot: e.closest('figure').getAttribute('aria-label')})),
    tables: all('.table-wrap').map(e => ({box: box(e), table: box(e.querySelector('table')),
      scroll: e.scrollWidth, client: e.clientWidth})),
  };
  const pre = document.createElement('pre');
  pre.id = 'slimgraph-layout';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


@dataclass(frozen=True)
class Layout:
    """Where things landed on a page rendered at a given window width (CSS pixels)."""

    viewport: int
    page: int  # the document's scroll width: above `viewport`, the page scrolls sideways
    texts: list[dict]  # {"text", "box": [l, t, r, b], "plot": the figure's aria-label,
    #                     "tick", "legend": whether it is a tick label or in the legend}
    points: list[dict]  # {"box", "plot"}
    tables: list[dict]  # {"box" (the wrapper), "table", "scroll", "client"}


def layout(page: Path, work: Path, *, width: int = 1280) -> Layout:
    """Render a copy of `page` at `width` px in headless Chromium and measure its boxes."""
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "measured.html"
    copy.write_text(page.read_text().replace("</body>", _MEASURE + "</body>"))
    flags = [flag for flag in FLAGS if not flag.startswith("--window-size")]
    command = [_chromium(), *flags, f"--window-size={width},1800",
               f"--user-data-dir={work / 'profile-layout'}", "--dump-dom", copy.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="slimgraph-layout">(.*?)</pre>', done.stdout, re.S)
    assert found, "the measuring script did not run"
    data = json.loads(html.unescape(found.group(1)))
    return Layout(data["viewport"], data["page"], data["texts"], data["points"], data["tables"])


def overlap(a: list[float], b: list[float]) -> float:
    """The area two boxes (left, top, right, bottom) share."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0
