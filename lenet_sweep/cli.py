"""What every `python -m lenet_sweep.<command>` does around its work: one-line errors, clean interrupts."""
from __future__ import annotations

import signal
import sys
from typing import Callable, TypeVar

from lenet_sweep.errors import UserError

T = TypeVar("T")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def guarded(work: Callable[[], T]) -> T:
    """Run `work`; turn a UserError into a one-line message and SIGTERM into Ctrl-C.

    Both exit non-zero. An interrupt unwinds through `tracking.tracked_run`, which ends the
    MLflow runs KILLED instead of leaving them RUNNING.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs and pipes as they happen
    try:
        return work()
    except UserError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the MLflow run(s) in progress are marked KILLED; what was logged is kept")
