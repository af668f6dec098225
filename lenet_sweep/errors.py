"""The errors a user fixes and a program does not: bad input (`UserError`) and a full or unwritable place
(no space left, read-only, no permission). Entry points turn both into one line instead of a traceback
(`cli.guarded`); the writers that know which knob names the place (decode cache, export) say so."""

from __future__ import annotations

import errno
import os
import re
import traceback
from typing import Optional


class UserError(ValueError):
    """Bad input the user can fix (data folder, config value, store); the message says how."""


# A write failing with one of these is the place's fault (full, over quota, read-only, someone else's),
# not the program's: the user frees space or writes elsewhere, and a traceback does not help them.
PLACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# TensorFlow's file system raises OpErrors (ResourceExhaustedError, PermissionDeniedError) without an
# errno; their message ends "<path>; <the C library's words for the errno> [Op:...]".
_TF_WORDS = {os.strerror(code): code for code in PLACE_ERRNOS}
_TF_PATH = re.compile(r"\s(/[^;{}\n]*); (" + "|".join(map(re.escape, _TF_WORDS)) + ")")
# SQLite (an MLflow store) says SQLITE_FULL and SQLITE_READONLY in words, without an errno.
_SQLITE_WORDS = {"database or disk is full": errno.ENOSPC, "attempt to write a readonly database": errno.EROFS}


def place_errno(err: BaseException) -> Optional[int]:
    """The errno when `err` itself says a place is full or unwritable, else None."""
    if isinstance(err, OSError):
        return err.errno if err.errno in PLACE_ERRNOS else None
    module = type(err).__module__
    if module.startswith("tensorflow"):
        found = _TF_PATH.search(str(err))
        return _TF_WORDS[found.group(2)] if found else None
    if module == "sqlite3":
        return next((code for words, code in _SQLITE_WORDS.items() if words in str(err)), None)
    return None


def trouble(code: int) -> str:
    """What went wrong, in the C library's words and on what: "no space left on device writing",
    "read-only file system writing", "permission denied accessing" (a read can be refused too)."""
    return os.strerror(code).lower() + (" accessing" if code in (errno.EACCES, errno.EPERM) else " writing")


def failed_path(err: BaseException) -> Optional[str]:
    """The file the failing write went to, as far as `err` tells: a copy's destination, the file opened,
    or the path in a TensorFlow message. A write() that fails mid-file names none."""
    if isinstance(err, OSError):
        where = err.filename2 or err.filename  # shutil's copies put the destination in filename2
        return os.fsdecode(where) if isinstance(where, (str, bytes, os.PathLike)) else None
    found = _TF_PATH.search(str(err))
    return found.group(1) if found else None


def _mlflow_place(chain: list[BaseException]) -> Optional[tuple[str, str]]:
    """("the MLflow artifact store" | "the MLflow tracking store", where) when MLflow's own store code was
    writing when the error came, from that code's frame in the traceback.

    MLflow's local artifact repository copies each artifact into a temporary file with write(), whose
    error names no path, and SQLite's errors name no file: the repository's or store's `self` says where.
    """
    for err in chain:
        for frame, _ in reversed(list(traceback.walk_tb(err.__traceback__))):
            module = frame.f_globals.get("__name__", "")
            owner = frame.f_locals.get("self")
            if module.startswith("mlflow.store.artifact"):
                where = getattr(owner, "artifact_dir", None) or getattr(owner, "artifact_uri", None)
                if where:
                    return "the MLflow artifact store", str(where)
            if module.startswith("mlflow.store.tracking"):
                where = getattr(owner, "db_uri", None)
                if where:
                    return "the MLflow tracking store", str(where)
    return None


def unwritable(code: int, what: str, where: object, advice: str) -> UserError:
    """The one line for a failed write to a place a knob names: what went wrong, where, what to do."""
    return UserError(f"{trouble(code)} {what} at {where}: {advice}")


def _chain(err: Optional[BaseException]) -> list[BaseException]:
    """`err` and the errors it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    while err is not None and all(err is not e for e in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _where(segment: list[BaseException]) -> tuple[str, bool]:
    """(what was being written and where, whether it is MLflow's store) for a place error (last in
    `segment`) and the errors that wrap it (before it)."""
    mlflow_place = _mlflow_place(segment)
    if mlflow_place is not None:
        return f"{mlflow_place[0]} at {mlflow_place[1]}", True
    path = failed_path(segment[-1])
    return (path, False) if path is not None else ("a file the system did not name", False)


def place_message(err: BaseException) -> Optional[str]:
    """One line naming the full or unwritable place behind `err` (or behind an error it was raised from or
    while handling) and what to do; None when `err` is about something else, or is a UserError (whose
    message already says what to do)."""
    if isinstance(err, UserError):
        return None
    chain = _chain(err)
    ends = [i for i, e in enumerate(chain) if place_errno(e) is not None]
    if not ends:
        return None
    # The innermost place error came first; any outer one failed while handling it (cleaning up, or an
    # MLflow store on the same full disk recording the failure), and each wraps the errors before it.
    segments = [chain[start + 1 : end + 1] for start, end in zip([-1, *ends], ends)]
    first = segments[-1]
    code = place_errno(first[-1])
    where, in_mlflow = _where(first)
    if in_mlflow:
        advice = (
            "free space there (or make it writable), or log to a store elsewhere (mlflow.store_dir=DIR or "
            "mlflow.tracking_uri=URI); runs logged before are kept"
        )
    elif where.startswith("/"):
        advice = "free space there (or make it writable), or give the command another folder"
    else:
        advice = "free space on the full file system (`df -h` shows which), or give the command other folders"
    line = f"{trouble(code)} {where}: {advice}"
    told = {where}
    for later in reversed(segments[:-1]):
        other = _where(later)[0]
        if other not in told:  # the same place failing again while cleaning up adds nothing
            told.add(other)
            line += f"; then {trouble(place_errno(later[-1]))} {other} too, while handling it"
    return line
