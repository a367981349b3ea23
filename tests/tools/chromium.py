"""Headless Chromium for the report pages: render a page, list what it fetched from the network.

Debian's `chromium` package (`.ci/run` installs it). Each call uses a fresh profile folder and
writes a NetLog (`--log-net-log`); requests made by the page are the URL requests whose network
isolation key is the page's own site (`file://`); Chromium's own background traffic (component
updates, time checks) runs under other keys and is ignored.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

__all__ = ["Rendered", "render", "remote_references"]

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
