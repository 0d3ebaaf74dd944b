"""Screenshot the built documentation site in headless Chromium into docs/docs_site.png.

Builds the site first (``sphinx-build -W``, as ``make docs``) unless ``--no-build``, then opens a page of
``docs/_build/html`` in Debian's ``chromium`` (``apt-get install -y chromium``) with ``--headless --screenshot``:
the page as a reader sees it, rendered by a real browser from the files on disk. The PNG is re-encoded with a
palette (Pillow) to stay small.

Usage:
  python scripts/docs_screenshot.py [--page guide/early-stopping.html] [--out docs/docs_site.png]
      [--size 1400x1000] [--chromium /usr/bin/chromium] [--no-build]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--page", default="get-started.html", help="page of docs/_build/html to show")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "docs_site.png")
    parser.add_argument("--size", default="1400x1000", help="window WIDTHxHEIGHT")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--no-build", action="store_true", help="use the site already in docs/_build/html")
    args = parser.parse_args()
    if not args.chromium:
        print("docs_screenshot: no chromium found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    html = ROOT / "docs" / "_build" / "html"
    if not args.no_build:
        subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(ROOT / "docs"), str(html)],
                       check=True)
    page = html / args.page
    if not page.is_file():
        print(f"docs_screenshot: {page} does not exist", file=sys.stderr)
        return 2
    width, height = args.size.split("x")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
                        f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
        from PIL import Image

        Image.open(shot).convert("RGB").quantize(colors=128).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} kB) from {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
