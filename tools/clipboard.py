"""vlad tool plugin: read or write the clipboard's text.

Reads {"action": "read"} or {"action": "write", "text": "..."} on stdin and answers
{"ok": true, "result": ...} or {"ok": false, "error": "..."} on stdout (see tools/README.md).
Uses wl-clipboard on Wayland, else xclip or xsel on X11.
"""

import json
import os
import shutil
import subprocess
import sys


def answer(ok, value):
    key = "result" if ok else "error"
    json.dump({"ok": ok, key: value}, sys.stdout, ensure_ascii=False)
    sys.exit(0)


def backend():
    """The commands that read and write the clipboard, or None."""
    if os.environ.get("WAYLAND_DISPLAY") and shutil.which("wl-paste") and shutil.which("wl-copy"):
        return ["wl-paste", "--no-newline"], ["wl-copy"]
    if shutil.which("xclip"):
        return ["xclip", "-selection", "clipboard", "-o"], ["xclip", "-selection", "clipboard", "-i"]
    if shutil.which("xsel"):
        return ["xsel", "--clipboard", "--output"], ["xsel", "--clipboard", "--input"]
    return None


def main():
    try:
        args = json.load(sys.stdin)
    except ValueError as e:
        answer(False, f"the arguments are not JSON: {e}")
    tools = backend()
    if tools is None:
        answer(False, "no clipboard program: install xclip or xsel (X11) or wl-clipboard (Wayland)")
    read, write = tools
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        answer(False, "there is no display (DISPLAY and WAYLAND_DISPLAY are unset)")
    if args.get("action") == "read":
        # The reader exits when done; nothing of it stays in the background.
        run = subprocess.run(read, stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
        if run.returncode != 0:
            answer(False, "the clipboard is empty or holds no text")
        answer(True, run.stdout.decode("utf-8", errors="replace"))
    if args.get("action") == "write":
        text = args.get("text")
        if not isinstance(text, str):
            answer(False, "write needs `text`, a string")
        # The writer stays in the background to serve the clipboard: it must not keep this
        # plugin's output pipes open.
        run = subprocess.run(
            write,
            input=text.encode("utf-8"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=5,
        )
        if run.returncode != 0:
            answer(False, f"{write[0]} failed with status {run.returncode}")
        answer(True, f"the clipboard now holds {len(text)} characters")
    answer(False, "`action` must be read or write")


main()
