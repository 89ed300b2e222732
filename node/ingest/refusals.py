"""Refused connections and associations, written once per source per interval.

A probe or a misconfigured modality retrying in a loop would otherwise write an audit row and a log
line per attempt. The first refusal of a kind (audit action) from a source in an interval is written at
once; later ones are only counted, and written as one entry when the interval ends: each entry's
``count`` is how many refusals of its action it stands for, its reason the latest's. Writing happens on
a thread of its own, so the accepting thread never waits on the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_SOURCES = 10_000  # sources remembered at once; beyond, refusals from new ones share one entry
OTHER_SOURCES = "(other sources)"
REJECTED = "association.rejected"


@dataclass(frozen=True)
class Refusal:
    """What is written: the latest refusal from a source, and how many refusals the entry stands for."""

    action: str  # the audit action: association.rejected, association.tls_refused
    address: str
    reason: str
    calling_ae: str
    count: int


@dataclass
class _Source:
    written_at: float
    latest: Refusal
    suppressed: int = 0


class RefusalLog:
    """Counts refusals per source and hands ``write`` at most one per source per ``interval`` seconds."""

    def __init__(self, write: Callable[[Refusal], None], interval: float) -> None:
        self._write = write
        self._interval = interval
        self._sources: dict[tuple[str, str], _Source] = {}  # by (action, address)
        self._due: list[Refusal] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="refusal-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write what is due and what was counted, then end the thread."""
        if not self._thread.is_alive():  # never started: the listener did not start
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def note(self, address: str, reason: str, calling_ae: str = "", action: str = REJECTED) -> None:
        """One refusal; never blocks on the database (called from the listener's threads)."""
        now = time.monotonic()
        with self._lock:
            if (action, address) not in self._sources and len(self._sources) >= MAX_SOURCES:
                address = OTHER_SOURCES
            refusal = Refusal(action, address, reason, calling_ae, 1)
            source = self._sources.get((action, address))
            if source is None or now - source.written_at >= self._interval:
                carried = source.suppressed if source is not None else 0  # not yet written by _collect
                self._sources[action, address] = _Source(now, refusal)
                self._due.append(Refusal(action, address, reason, calling_ae, 1 + carried))
                self._wake.set()
            else:
                source.latest = refusal
                source.suppressed += 1

    def _collect(self, everything: bool) -> list[Refusal]:
        """What is due: first refusals, and counts whose interval has ended (all counts at stop)."""
        now = time.monotonic()
        with self._lock:
            due, self._due = self._due, []
            for key, source in list(self._sources.items()):
                if now - source.written_at < self._interval and not everything:
                    continue
                if source.suppressed:
                    latest = source.latest
                    due.append(
                        Refusal(
                            latest.action, latest.address, latest.reason, latest.calling_ae, source.suppressed
                        )
                    )
                del self._sources[key]
        return due

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=min(self._interval, 1.0))
            self._wake.clear()
            stopping = self._stopping
            for refusal in self._collect(everything=stopping):
                try:
                    self._write(refusal)
                except Exception:  # a database outage must not end the thread; the count is lost
                    log.exception("refusal from %s not written", refusal.address)
            if stopping:
                return
