"""Many hosts, one run: the launch flags every entry point shares, and
`jax.distributed.initialize` started from them before anything else touches JAX.

Every process runs the same command. On a TPU pod slice, a SLURM allocation or a
Kubernetes job `--distributed` lets JAX find its peers; elsewhere the coordinator is
named (`--coordinator-address HOST:PORT --num-processes N --process-id I`). A
coordinator that does not answer, or peers that never arrive, is an error after
`--coordinator-timeout` seconds, not a hang.

Once started, every process beats in the coordinator's key-value store (PeerWatch).
A process that stops beating for `--peer-timeout` seconds (killed, its host lost) is
named by the others, which exit with status 75 (LOST_PEER, "try again") instead of
hanging in a collective or dying in JAX's own abort: the checkpoints already saved
are kept, and re-running the same commands resumes from the last one.

`--cpu-devices N` makes this process's CPU N devices. A run's digits depend on its
global device count (each device sums its share of the batch, and the shares are then
added), never on how the devices are spread over processes: one process with 2 CPU
devices computes what 2 processes with 1 device each compute, bit for bit.
"""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import time

import jax
from jax._src import distributed as jax_distributed  # the coordinator's key-value store

from cnn_jax.errors import BadInput

FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id",
         "coordinator_timeout", "peer_timeout", "cpu_devices")
LOST_PEER = 75   # exit status when another process was lost: re-run to resume
BEAT = 2.0       # seconds between a process's signs of life


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many hosts (jax.distributed): every process runs the same "
                             "command")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with auto-detection (TPU pods, "
                        "SLURM, Kubernetes, ...)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="process 0's address, for a launch without auto-detection")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--coordinator-timeout", type=int, default=300, metavar="SECONDS",
                   help="give up when the coordinator or a peer has not answered by then")
    g.add_argument("--peer-timeout", type=int, default=30, metavar="SECONDS",
                   help="a process silent this long is lost: the others save nothing more "
                        f"and exit {LOST_PEER} (re-run the same commands to resume)")
    g.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="split this process's CPU into N devices (the same global device "
                        "count as a many-process run gives its digits)")


def initialize(args: argparse.Namespace) -> None:
    """Start the many-host runtime (and the CPU devices) the flags ask for; a no-op
    for a single process. Must run before JAX's first computation."""
    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            raise BadInput(f"--cpu-devices must be at least 1; got {args.cpu_devices}")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if not (args.distributed or args.coordinator_address):
        for flag in ("num_processes", "process_id"):
            if getattr(args, flag) is not None:
                raise BadInput(f"--{flag.replace('_', '-')} needs --coordinator-address "
                               f"(or --distributed)")
        return
    kwargs = {}
    if args.coordinator_address:
        if args.num_processes is None or args.process_id is None:
            raise BadInput("--coordinator-address needs --num-processes and --process-id")
        if not 0 <= args.process_id < args.num_processes:
            raise BadInput(f"--process-id must be in 0..{args.num_processes - 1}; got "
                           f"{args.process_id}")
        kwargs = dict(coordinator_address=args.coordinator_address,
                      num_processes=args.num_processes, process_id=args.process_id)
    # CPU hosts exchange collectives over gloo; accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = (f"--coordinator-address {args.coordinator_address} (process {args.process_id} "
             f"of {args.num_processes})" if args.coordinator_address
             else "--distributed (the auto-detected cluster)")
    # JAX's runtime aborts the process when its peers do not answer (it cannot be
    # caught): a watchdog says why first and exits 2, before JAX's own deadline.
    met = threading.Event()
    threading.Thread(target=_give_up_unless, args=(met, args.coordinator_timeout, where),
                     daemon=True).start()
    if args.peer_timeout < 5:
        raise BadInput(f"--peer-timeout must be at least 5 seconds; got {args.peer_timeout}")
    # JAX's own heartbeat aborts a process whose peer is gone; ours names it first
    jax.distributed.initialize(initialization_timeout=args.coordinator_timeout + 60,
                               heartbeat_timeout_seconds=max(100, 2 * args.peer_timeout),
                               **kwargs)
    met.set()
    PeerWatch(args.peer_timeout).start()


def _give_up_unless(met: threading.Event, seconds: int, where: str) -> None:
    if met.wait(seconds):
        return
    print(f"error: {where}: the processes did not all meet within --coordinator-timeout "
          f"{seconds} s. Is every process started with the same command, and is the "
          f"coordinator's address reachable from each? Nothing was written.",
          file=sys.stderr, flush=True)
    os._exit(2)


class PeerWatch:
    """Signs of life between the processes of a run, through the coordinator's
    key-value store: each process bumps its counter every BEAT seconds and reads the
    others'. One whose counter stands still for `timeout` seconds is lost; so is the
    coordinator (process 0) when the store stops answering. Then this process says
    which and exits LOST_PEER at once, whatever its main thread is blocked in (a
    collective with the lost process never returns). A process that finishes says so
    (`done`), so that its peers do not take its exit for a loss."""

    KEY = "cnn_jax/alive/"

    def __init__(self, timeout: int):
        self.timeout = timeout
        self.me, self.count = jax.process_index(), jax.process_count()
        self.client = jax_distributed.global_state.client
        self.finished = threading.Event()   # this process is exiting: stop watching
        self.thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()
        # atexit runs last-in first-out: this before JAX's own shutdown barrier
        atexit.register(self._done)
        hook = sys.excepthook
        sys.excepthook = lambda *exc: (self._await_verdict(exc[1]), hook(*exc))

    def _run(self) -> None:
        seen = {i: (None, time.monotonic()) for i in range(self.count) if i != self.me}
        beat = 0
        while not self.finished.is_set():
            beat += 1
            try:
                self.client.key_value_set(f"{self.KEY}{self.me}", str(beat), allow_overwrite=True)
                for i in list(seen):
                    value = self._read(i)
                    if value == "done":
                        del seen[i]
                    elif value != seen[i][0]:
                        seen[i] = (value, time.monotonic())
            except Exception as e:  # the store itself is gone: process 0 hosts it
                if self.me != 0 and not self.finished.is_set():
                    self._lost(0, f"the coordinator stopped answering ({type(e).__name__})")
            now = time.monotonic()
            for i, (_, since) in seen.items():
                if self.finished.is_set():
                    return
                if now - since > self.timeout:
                    self._lost(i, f"no sign of life for {self.timeout} s")
            self.finished.wait(BEAT)

    def _read(self, i: int):
        try:
            return self.client.key_value_try_get(f"{self.KEY}{i}")
        except Exception as e:
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None  # not started beating yet
            raise

    def _lost(self, i: int, how: str) -> None:
        print(f"error: process {i} of {self.count} was lost ({how}); process {self.me} "
              f"stops too. Checkpoints already saved are kept: re-run the same commands "
              f"on every host to resume from the last one.", file=sys.stderr, flush=True)
        os._exit(LOST_PEER)

    def _done(self) -> None:
        # the watch leaves the coordinator's client first: a daemon thread still in
        # one of its calls when Python finalizes aborts the process (std::terminate
        # on the forced unwind), exit -6 instead of the run's status
        self.finished.set()
        self.thread.join(timeout=BEAT + 10)
        try:
            self.client.key_value_set(f"{self.KEY}{self.me}", "done", allow_overwrite=True)
        except Exception:  # the store is gone already: nothing to tell
            pass

    def _await_verdict(self, error: BaseException) -> None:
        """An error escaped the main thread: when it is a failed exchange with another
        process (a collective fails as soon as its peer dies), give the watch the time
        to name a lost process before the traceback."""
        if any(w in str(error) for w in ("Gloo", "onnect", "UNAVAILABLE", "heartbeat",
                                          "arrier", "DEADLINE_EXCEEDED")):
            time.sleep(self.timeout + 2 * BEAT)
