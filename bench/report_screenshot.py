"""Open a quicknat HTML report in headless Chromium and save a screenshot (skips cleanly when
Chromium is not installed: Debian's `chromium` package provides it).

    python bench/report_screenshot.py REPORT.html [-o report.png] [--height 3000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", type=Path)
    ap.add_argument("-o", "--output", type=Path, default=Path("report.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=3000)
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("skipped: no Chromium on this machine (apt-get install chromium)")
        return 0
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--window-size={args.width},{args.height}",
               f"--screenshot={args.output.resolve()}", args.report.resolve().as_uri()]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not args.output.exists():
        print(out.stderr[-2000:], file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
