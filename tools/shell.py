"""vlad tool plugin: run a shell command in a scratch working folder.

Reads {"command": "...", "timeout_s": 20} on stdin; answers {"ok": true, "result": {"exit_status",
"stdout", "stderr", "folder"}} or {"ok": false, "error": "..."} (see tools/README.md). The command
runs with `sh -c` in $VLAD_SHELL_SANDBOX (default ~/.local/state/vlad/shell-sandbox, created when
missing), with only PATH, LANG and HOME (the folder) in its environment, in a process group of its
own that is killed when the timeout passes. Output is cut to OUTPUT_LIMIT characters per stream.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_TIMEOUT_S = 20
MAX_TIMEOUT_S = 50
OUTPUT_LIMIT = 8000


def answer(ok, value):
    key = "result" if ok else "error"
    json.dump({"ok": ok, key: value}, sys.stdout, ensure_ascii=False)
    sys.exit(0)


def sandbox():
    folder = os.environ.get("VLAD_SHELL_SANDBOX")
    if not folder:
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
        folder = os.path.join(state, "vlad", "shell-sandbox")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def cut(data):
    text = data.decode("utf-8", errors="replace")
    if len(text) > OUTPUT_LIMIT:
        return text[:OUTPUT_LIMIT] + f"… ({len(text) - OUTPUT_LIMIT} more characters cut)"
    return text


def main():
    try:
        args = json.load(sys.stdin)
    except ValueError as e:
        answer(False, f"the arguments are not JSON: {e}")
    command = args.get("command")
    if not isinstance(command, str) or not command.strip():
        answer(False, "`command` must be a non-empty string")
    timeout = args.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, (int, float)) or not 1 <= timeout <= MAX_TIMEOUT_S:
        answer(False, f"`timeout_s` must be a number from 1 to {MAX_TIMEOUT_S}")
    try:
        folder = sandbox()
    except OSError as e:
        answer(False, f"cannot create the working folder: {e}")
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": str(folder),
    }
    proc = subprocess.Popen(
        ["sh", "-c", command],
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        answer(False, f"the command did not finish within {timeout} s and was stopped; "
                      f"its output so far: {cut(out)!r}, errors: {cut(err)!r}")
    answer(True, {
        "exit_status": proc.returncode,
        "stdout": cut(out),
        "stderr": cut(err),
        "folder": str(folder),
    })


main()
