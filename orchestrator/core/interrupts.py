"""Ctrl-C and SIGTERM: the run is recorded KILLED (not FAILED), the user is told how to resume,
and the process exits 130.

Ray's own handlers turn an interrupt inside ``trainer.fit()`` or ``tuner.fit()`` into other
exceptions, so the handler here remembers that an interrupt was asked for; whoever closes a run
asks :func:`requested` to choose between KILLED and FAILED. The command that is running names
itself (:func:`current`) so that the message can say what to run again.
"""

from __future__ import annotations

import signal
from typing import Any

_state: dict[str, Any] = {"requested": False, "what": None, "resume": None}


def requested() -> bool:
    return bool(_state["requested"])


def current(what: str, resume: str) -> None:
    """Name the run being trained and the command that resumes it (for the interrupt message)."""
    _state["what"], _state["resume"] = what, resume


def describe() -> tuple[str | None, str | None]:
    return _state["what"], _state["resume"]


def status_after_error() -> str:
    return "KILLED" if requested() else "FAILED"


def install() -> dict[int, Any]:
    """SIGINT and SIGTERM mark the interrupt and raise KeyboardInterrupt in the main thread.
    Returns the handlers it replaced (for :func:`restore`)."""

    def handler(signum, frame):
        _state["requested"] = True
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass
    return previous


def restore(previous: dict[int, Any]) -> None:
    for sig, h in previous.items():
        try:
            signal.signal(sig, h)
        except (ValueError, OSError, TypeError):
            pass
    _state.update(requested=False, what=None, resume=None)
