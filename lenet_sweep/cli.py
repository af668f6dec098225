"""What every `python -m lenet_sweep.<command>` does around its work: one-line errors, clean interrupts."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TypeVar

from lenet_sweep.errors import UserError, place_message

T = TypeVar("T")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def guarded(work: Callable[[], T]) -> T:
    """Run `work`; turn a UserError, or a write to a full or unwritable place, into a one-line message
    naming it, and SIGTERM into Ctrl-C.

    All exit non-zero. An error or interrupt unwinds through `tracking.tracked_run` first, which ends
    the MLflow runs FAILED (with the reason) or KILLED instead of leaving them RUNNING.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs and pipes as they happen
    try:
        return work()
    except UserError as err:
        sys.exit(f"error: {err}")
    except Exception as err:
        # A full disk or read-only folder is the user's to fix, like a UserError; any other error is a
        # bug, and its traceback is what the bug report needs.
        line = place_message(err)
        if line is None:
            raise
        sys.exit(f"error: {line}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the MLflow run(s) in progress are marked KILLED; what was logged is kept")


def _quoted(value: str) -> str:
    """`value` as a Hydra quoted string: any character allowed, quotes and a trailing backslash escaped."""
    escaped = value.replace("\\'", "\\\\'").replace("'", "\\'")
    if escaped.endswith("\\") and not escaped.endswith("\\\\"):
        escaped += "\\"
    return f"'{escaped}'"


def quote_path_overrides(keys: tuple[str, ...] = (), list_keys: tuple[str, ...] = ()) -> None:
    """Let paths with spaces, brackets, quotes or commas through Hydra's override grammar, as typed.

    `key=/my photos/cat (1).jpg` becomes `key='/my photos/cat (1).jpg'`; for `list_keys`,
    `images=a.jpg,b.jpg` (a sweep to Hydra) becomes the list `images=['a.jpg','b.jpg']`. Values already
    quoted or written as lists are left as they are. Rewrites sys.argv before Hydra reads it.
    """
    for i, arg in enumerate(sys.argv[1:], start=1):
        key, sep, value = arg.partition("=")
        if (
            not sep
            or not value
            or value[0] in "'\""
            or (value[0] == "[" and value[-1] == "]")
            or value == "null"
            or value.startswith("${")
        ):
            continue
        if key in list_keys:
            sys.argv[i] = f"{key}=[{','.join(_quoted(v) for v in value.split(',') if v)}]"
        elif key in keys:
            sys.argv[i] = f"{key}={_quoted(value)}"


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss, for progress lines."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def exec_server(
    command: list[str], env: dict[str, str], host: str, port: int, holder: str, advice: str, banner: str
) -> None:
    """Replace this process with a server (`command`): Ctrl-C and SIGTERM then reach it (and its uvicorn)
    directly. A taken port is refused first, naming its likely `holder` and what to do; `banner` says where
    the server is."""
    if not port_free(host, port):
        raise UserError(f"port {port} on {host} is taken ({holder}?): {advice}")
    print(banner)
    sys.stdout.flush()
    os.execve(sys.executable, command, env)
