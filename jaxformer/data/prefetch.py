"""Batches made ahead of the device: a background thread keeps a bounded queue full.

The thread runs the iterator and records its position after each batch; `state_dict()` answers the
position after the last batch handed to the caller (the last the model consumed), not the producer's,
so a checkpoint taken while batches wait in the queue still resumes exactly.
"""

from __future__ import annotations

import queue
import threading

_END = object()


class Prefetcher:
    """Iterate `iterator` (with `state_dict`/`load_state_dict`) `depth` batches ahead in a daemon thread."""

    def __init__(self, iterator, depth: int = 4):
        self._it = iterator
        self._depth = max(1, int(depth))
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state: dict | None = None

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("load the data position before the first batch is taken")
        self._it.load_state_dict(state)

    def state_dict(self) -> dict:
        return self._it.state_dict() if self._thread is None else self._state

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._thread is None:
            self._state = self._it.state_dict()
            self._queue = queue.Queue(maxsize=self._depth)
            self._thread = threading.Thread(target=self._produce, name="jaxformer-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # later calls end too
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        batch, self._state = item
        return batch

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self) -> None:
        try:
            for batch in self._it:
                if not self._put((batch, self._it.state_dict())):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)

    def close(self) -> None:
        """Stop the thread (it ends after the batch it is making)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
