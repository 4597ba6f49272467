"""Many hosts, one run: the launch flags every entry point shares, and
`jax.distributed.initialize` started from them before anything else touches JAX.

Every process runs the same command. On a TPU pod slice, a SLURM allocation or a
Kubernetes job `--distributed` lets JAX find its peers; elsewhere the coordinator is
named (`--coordinator-address HOST:PORT --num-processes N --process-id I`). A
coordinator that does not answer, or peers that never arrive, is an error after
`--coordinator-timeout` seconds, not a hang.

`--cpu-devices N` makes this process's CPU N devices. A run's digits depend on its
global device count (each device sums its share of the batch, and the shares are then
added), never on how the devices are spread over processes: one process with 2 CPU
devices computes what 2 processes with 1 device each compute, bit for bit.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

import jax

from cnn_jax.errors import BadInput

FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id",
         "coordinator_timeout", "cpu_devices")


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
    jax.distributed.initialize(initialization_timeout=args.coordinator_timeout + 60, **kwargs)
    met.set()


def _give_up_unless(met: threading.Event, seconds: int, where: str) -> None:
    if met.wait(seconds):
        return
    print(f"error: {where}: the processes did not all meet within --coordinator-timeout "
          f"{seconds} s. Is every process started with the same command, and is the "
          f"coordinator's address reachable from each? Nothing was written.",
          file=sys.stderr, flush=True)
    os._exit(2)
