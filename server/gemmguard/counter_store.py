"""Counter totals that outlive their process: a small JSON file in GEMMGUARD_STATE_DIR.

A Prometheus counter starts again at 0 with its process, so an alert on it forgets what happened
before a restart, and the restarts that matter most (the kubelet killing a container whose engine
hung, an engine that crashed) follow exactly the failures the counter recorded. The chart mounts a
pod-lifetime emptyDir at the state directory, which survives container restarts.

Every process adds its increments to the file. Only the first process that *claims* the directory
after a start restores the totals into its counters (the claim is an flock the kernel drops when the
process dies), so with several API servers, whose counters vLLM's Prometheus multiprocess mode sums,
the old total is counted once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

logger = logging.getLogger("vllm.gemmguard")

TOTALS_FILE = "counters.json"
# Held (LOCK_EX) by the process that restored the totals, for as long as it lives.
CLAIM_FILE = "claim.lock"
# Held briefly around every read-modify-write of TOTALS_FILE (which is replaced, not rewritten).
WRITE_LOCK_FILE = "counters.lock"
# When the directory was first used: the first start of the pod that holds it.
CREATED_FILE = "created"

Labels = tuple[str, ...]
# Starts of the server with this directory, counted by the server process before vLLM starts
# (`count_start`), so that a start that crashes while loading counts too.
STARTS = "starts"


class CounterStore:
    """Totals per counter name and label values, kept in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._claim_fd: int | None = None

    # --- the restore claim ------------------------------------------------------------------
    def claim(self) -> bool:
        """True when this process is the first live one to ask: it restores the totals."""
        if self._claim_fd is not None:
            return True
        fd = os.open(self.directory / CLAIM_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._claim_fd = fd
        return True

    def release(self) -> None:
        """Give the claim up (the process's exit does the same)."""
        if self._claim_fd is not None:
            os.close(self._claim_fd)
            self._claim_fd = None

    def created(self) -> float:
        """When this directory was first used (Unix seconds), recorded by its first caller.

        The counters in it live as long as it does; a new time for the same pod name means the
        pod, and with it every total here, was replaced (e.g. a LeaderWorkerSet group recreation).
        """
        path = self.directory / CREATED_FILE
        with self._locked(fcntl.LOCK_EX):
            try:
                return float(path.read_text())
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                logger.warning("gemmguard: rewriting unreadable %s (%s)", path, exc)
            now = time.time()
            tmp = self.directory / f".{CREATED_FILE}.{os.getpid()}"
            tmp.write_text(repr(now))
            os.replace(tmp, path)
            return now

    # --- totals -------------------------------------------------------------------------------
    def totals(self, name: str) -> dict[Labels, float]:
        """Every label set's total of counter `name`."""
        with self._locked(fcntl.LOCK_SH):
            rows = self._read().get(name, {})
        return {tuple(json.loads(key)): float(value) for key, value in rows.items()}

    def add(self, name: str, labels: Labels, amount: float) -> float:
        """Add `amount` to one total and return the new total."""
        key = json.dumps(list(labels))
        with self._locked(fcntl.LOCK_EX):
            data = self._read()
            rows = data.setdefault(name, {})
            rows[key] = float(rows.get(key, 0.0)) + amount
            tmp = self.directory / f".{TOTALS_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps(data, sort_keys=True))
            # Atomic: a process killed mid-write leaves the previous totals, never half a file.
            os.replace(tmp, self.directory / TOTALS_FILE)
            return float(rows[key])

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        fd = os.open(self.directory / WRITE_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, dict[str, float]]:
        path = self.directory / TOTALS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Losing old totals is better than a server that cannot start over a bad file.
            logger.warning("gemmguard: ignoring unreadable counter totals %s (%s); counters "
                           "start from 0. Delete the file if this repeats.", path, exc)
            return {}
        return data if isinstance(data, dict) else {}


def count_start(directory: Path) -> float:
    """Count one start of the server with `directory`; returns the starts counted so far."""
    return CounterStore(directory).add(STARTS, (), 1)


class PersistedCounter:
    """A prometheus_client Counter whose increments also go to a CounterStore.

    Used as the Counter itself: `.labels(...).inc()`, or `.inc()` without labels; every other
    attribute of a child is the real child's.
    """

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (), *,
                 registry: CollectorRegistry | None, store: CounterStore | None) -> None:
        self.counter = Counter(name, documentation, tuple(labelnames), registry=registry)
        self.name = name
        self.store = store

    def labels(self, *values: str) -> _PersistedChild:
        return _PersistedChild(self, self.counter.labels(*values), tuple(map(str, values)))

    def inc(self, amount: float = 1.0) -> None:
        _PersistedChild(self, self.counter, ()).inc(amount)

    def restore(self) -> None:
        """Add the stored totals to the counter (once per claim: see the module docstring)."""
        if self.store is None:
            return
        for labels, total in self.store.totals(self.name).items():
            child = self.counter.labels(*labels) if labels else self.counter
            if total > 0:
                child.inc(total)


class _PersistedChild:
    def __init__(self, parent: PersistedCounter, child: Counter, labels: Labels) -> None:
        self._parent = parent
        self._child = child
        self._labels = labels

    def inc(self, amount: float = 1.0) -> None:
        self._child.inc(amount)
        if self._parent.store is not None:
            self._parent.store.add(self._parent.name, self._labels, amount)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._child, name)
