"""Stopping cleanly on SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C).

While training, `StopSignals` turns either signal into a request: the loop finishes the step it is in,
writes a checkpoint of that step (with the data position of the last batch it consumed), waits for the
write, and raises `Preempted`; `python train.py` then exits with 128 + the signal's number (143 for
SIGTERM, 130 for SIGINT), and rerunning the same command resumes from that step. A second SIGINT stops
at once (KeyboardInterrupt), from the last checkpoint written.

With several processes, a signal often reaches only some of them, or reaches them between different
steps; every process votes after each step (`parallel.any_process_later`, read a step later so that the
device never waits for it) and all stop after the same one. (JAX's own preemption notifier also watches
SIGTERM once `jax.distributed` is initialised; these handlers take the signal over while the loop runs
and give it back afterwards.)
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; rerunning resumes from `step`."""

    def __init__(self, message: str, *, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM/SIGINT set `stop.signum` instead of killing the process.

    Outside the main thread (where Python cannot install handlers) it does nothing. The handlers that were
    installed before are restored on exit.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: stopping after the current step and saving a checkpoint",
                        signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: the handler was not installed from Python (e.g. JAX's notifier); the default is the best
            # Python can put back.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
