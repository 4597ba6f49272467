"""A stop asked of one process or decided by one, agreed by all.

Why a process would stop before its next compiled call: a signal it received (SIGTERM,
as a preemption notice is; SIGINT) or its input failing (its workers kept dying, a file
it must refuse). Many processes agree on it before the call: each tells the others its
reason (one small all-gather per call; a single process asks no one), so that all stop
after the same step, save once together and exit with the same status, and none waits
in a collective for one that has left (docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from cnn_jax.errors import BadInput


class Stops:
    """SIGTERM and SIGINT, while installed, set a flag the loop reads between calls."""

    def __init__(self):
        self.received: Optional[int] = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _handle(self, signum, frame):
        self.received = signum

    def agree(self, failed: Optional[BaseException]) -> np.ndarray:
        """Every process's exit status if it stopped now (0: no reason to), in process
        order: 128 + a signal's number, or 2 for a failed input."""
        mine = 128 + self.received if self.received is not None else (2 if failed else 0)
        if jax.process_count() == 1:
            return np.array([mine])
        return np.asarray(multihost_utils.process_allgather(np.int32(mine))).reshape(-1)


def reason(status: int) -> str:
    """A stop's exit status in words."""
    return signal.Signals(status - 128).name if status > 128 else "its input failed"


def halt(statuses: np.ndarray, step: int, failed: Optional[BaseException], folders: list):
    """End this process after the agreed stop at `step` (its checkpoints saved): the
    failing process's own error where an input failed (exit 2), another's named
    otherwise, or a signal's exit status; each says why and how to resume."""
    me, status = int(statuses[jax.process_index()]), int(statuses.max())
    others = ", ".join(f"process {i} ({reason(int(c))})" for i, c in enumerate(statuses)
                       if c and i != jax.process_index())
    resume = (f"re-run the same command{'s on every host' if len(statuses) > 1 else ''} "
              f"to {f'resume from step {step} (saved)' if step else 'start again'}")
    if status == 2 and failed is not None:   # this process's input: its own words
        raise type(failed)(f"{failed}{f' (and {others})' if others else ''}, then "
                           f"{resume}.") from None
    if status == 2:
        raise BadInput(f"{others} stopped the run (its message says why); every process "
                       f"stopped after step {step}: {resume}.")
    saved = f"saved step {step} to {', '.join(map(str, folders))}" if step else \
        "stopped before the first step"
    print(f"{reason(me) + ': ' if me else ''}{saved}{f'; stopped for {others}' if others else ''}"
          f"; {resume}", file=sys.stderr)
    raise SystemExit(status)
