"""The one interface the pipeline and the supervisor know sources and stages by.

A source runner, a stage runner (topic, window, model, sink) and a Faust stage each run in a
thread of their own; the pipeline starts, stops and joins them, asks whether they are alive,
idle or ready, and the supervisor restarts them after a failure (``error``), all through
:class:`Stage` alone.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod


class Stage(ABC):
    """A source or stage running in its own thread until :meth:`stop`, or until it fails."""

    def __init__(self, name: str, thread_name: str) -> None:
        self.name = name
        self.error: BaseException | None = None  # what ended the thread, if it failed
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to finish its work and end (it ends on its own; see :meth:`join`)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    @abstractmethod
    def _run(self) -> None:
        """The thread's body; it sets ``error`` rather than raise."""

    @property
    @abstractmethod
    def last_activity(self) -> float:
        """Monotonic time of the last record handled (a source: the time it ran out of records)."""

    @abstractmethod
    def is_idle(self, since: float) -> bool:
        """Nothing left to do, as measured after ``since`` (the pipeline's last activity)."""

    @property
    def state(self) -> str:
        """``running``; ``failed`` once ended by an error (to be restarted, or fatal); else
        ``finished`` (a source ran out of records, or the stage was stopped)."""
        if self.is_alive():
            return "running"
        return "failed" if self.error else "finished"

    def not_ready(self) -> str | None:
        """Why the stage is not ready (for /readyz), or None when it is."""
        if not self.is_alive():
            return "not running (restarting)" if self.error else "stopped"
        return self.starting()

    def starting(self) -> str | None:
        """What a running stage still waits for before it is ready, or None."""
        return None
