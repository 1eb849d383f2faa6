"""Stopping a training run cleanly on SIGINT or SIGTERM: the first signal ends the run at the next step boundary
with a checkpoint, a second acts at once."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_signals():
    """Catch SIGINT and SIGTERM while training: yields a list that receives each caught signal's number.

    The first signal of a kind is only recorded, so that the loop can finish its step and save; the handler
    then gives way to the one it replaced, so a second Ctrl-C interrupts at once. Outside the main thread
    (where Python cannot set handlers) nothing is caught.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def record(signum, frame):
        caught.append(signum)
        signal.signal(signum, previous[signum])

    for sig in STOP_SIGNALS:
        signal.signal(sig, record)
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the training process, which still needs their batches to
    finish its step: a worker killed by a terminal's Ctrl-C, or by a SIGTERM sent to every process of the job
    (`kill -- -PGID`, a scheduler's preemption, `timeout` without --foreground), would fail that step instead.
    The training process stops them itself when its loop ends."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
