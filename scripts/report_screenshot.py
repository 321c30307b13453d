"""Open a taskres report page in headless Chromium and save a screenshot of it.

    python scripts/report_screenshot.py EXP/report/index.html docs/report.png [--full-page]

Drives Debian's Chromium (/usr/bin/chromium; `apt-get install chromium`) with Playwright for Python (the `test`
extra); Playwright downloads no browser of its own here. Prints the console errors, the requests that left the
file (a self-contained page makes none) and the page's size. tests/test_report_page.py uses ``browse``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browse(html: Path, screenshot: Path | None = None, width: int = 1280, height: int = 900, full_page=False, act=None):
    """Load ``html`` from disk (Playwright starts Chromium headless on a fresh temporary profile); return the console
    errors and page errors, the URLs requested other than the file itself, and whatever ``act(page)`` returns."""
    from playwright.sync_api import sync_playwright

    url = Path(html).resolve().as_uri()
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url) if r.url != url else None)
            page.goto(url, wait_until="load")
            result = act(page) if act is not None else None
            if screenshot is not None:
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            browser.close()
    return {"errors": errors, "requests": requests, "result": result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--full-page", action="store_true")
    args = ap.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html} is not a file; pass EXP/report/index.html", file=sys.stderr)
        return 2
    seen = browse(args.html, args.png, args.width, args.height, args.full_page)
    print(f"page: {args.html} ({args.html.stat().st_size / 1024:.0f} KiB); screenshot: {args.png}")
    print(f"console errors: {seen['errors'] or 'none'}; requests besides the page: {seen['requests'] or 'none'}")
    return 1 if seen["errors"] or seen["requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
