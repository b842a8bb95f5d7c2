"""vlad tool plugin: open a URL in the default application with xdg-open.

Reads {"url": "..."} on stdin; answers {"ok": true, "result": ...} or {"ok": false, "error": ...}
(see tools/README.md). Only http, https, mailto and file URLs are opened.
"""

import json
import shutil
import subprocess
import sys
from urllib.parse import urlparse

SCHEMES = ("http", "https", "mailto", "file")
# How long xdg-open may take to report a failure; after that the application is taken as started.
WAIT_S = 5


def answer(ok, value):
    key = "result" if ok else "error"
    json.dump({"ok": ok, key: value}, sys.stdout, ensure_ascii=False)
    sys.exit(0)


def main():
    try:
        url = json.load(sys.stdin).get("url")
    except (ValueError, AttributeError) as e:
        answer(False, f"the arguments are not a JSON object: {e}")
    if not isinstance(url, str) or not url.strip():
        answer(False, "`url` must be a non-empty string")
    scheme = urlparse(url.strip()).scheme.lower()
    if scheme not in SCHEMES:
        answer(False, f"only {', '.join(SCHEMES)} URLs are opened, not `{scheme or url}`")
    opener = shutil.which("xdg-open")
    if opener is None:
        answer(False, "xdg-open is not installed (Debian package xdg-utils)")
    # The application it starts outlives this plugin: own session, no inherited pipes.
    proc = subprocess.Popen(
        [opener, url.strip()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        status = proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        answer(True, f"opening {url.strip()}")
    if status != 0:
        answer(False, f"xdg-open could not open {url.strip()} (status {status})")
    answer(True, f"opened {url.strip()}")


main()
