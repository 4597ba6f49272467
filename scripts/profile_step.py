"""Where a train step's time goes: a jax.profiler trace of the engine's step,
summed by kernel (GPU) or XLA operation (CPU).

Runs the same step as scripts/bench_train.py (resident random data, compilation and
warm-up excluded), traces `--calls` compiled calls, and reads the trace's events back
(`perfetto_trace.json.gz`). On a GPU the device track holds one event per kernel, so
the summary says how many kernels one training step launches, how much of the wall
time the GPU is busy, which kernels cost most and how many of each kind it launches
(`kind`); on a CPU the events are XLA's operations on its worker threads. `--seeds S`
profiles S runs vmapped into one step (cnn_jax.train.steps.seeds_at_once). Host-side
events nest (a call inside a call), so a host track's busy time can exceed the wall
time; a GPU's kernels on one stream do not.

    python scripts/profile_step.py --model resnet56 --dtype bfloat16 --steps-per-call 10
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path


def read_trace(folder: Path) -> list[dict]:
    path = next(Path(folder).rglob("perfetto_trace.json.gz"))
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


CONVOLUTION = re.compile(r"conv|xmma|implicit_gemm|cutlass|cudnn|ReduceSplitK", re.I)


def kind(name: str) -> str:
    """A kernel's family: the library's convolutions (and their split-K reductions) as
    one, XLA's fusions by their name without the number (`loop_add_fusion_18` ->
    `loop_add_fusion`), so the step reads as how many of each kind it launches."""
    if CONVOLUTION.search(name) and not re.fullmatch(r"[a-z_\-.]+(\.\d+)?(_\d+)?", name):
        return "convolution (library kernels)"
    return re.sub(r"(\.\d+)?(_\d+)?$", "", name)


def summarise(events: list[dict], steps: int, wall_ms: float, top: int = 15) -> dict:
    """Per process track (device or host): events, busy time, the costliest names and
    the kinds of names (`kind`), per training step."""
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    tracks: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            slot = tracks[names.get(e["pid"], str(e["pid"]))][e["name"]]
            slot[0] += 1
            slot[1] += e["dur"] / 1000.0
    out = {}
    for track, by_name in tracks.items():
        busy = sum(ms for _, ms in by_name.values())
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
        kinds: dict = collections.defaultdict(lambda: [0, 0.0])
        for name, (n, ms) in by_name.items():
            kinds[kind(name)][0] += n
            kinds[kind(name)][1] += ms
        out[track] = {
            "events_per_step": sum(n for n, _ in by_name.values()) / steps,
            "busy_ms_per_step": busy / steps,
            "busy_fraction": busy / wall_ms if wall_ms else None,
            "top": [{"name": name[:120], "calls_per_step": n / steps, "ms_per_step": ms / steps}
                    for name, (n, ms) in ranked],
            "kinds": [{"kind": k, "calls_per_step": n / steps, "ms_per_step": ms / steps}
                      for k, (n, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:top]]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps-per-call", type=int, default=1)
    p.add_argument("--seeds", type=int, default=1, help="runs vmapped into one step")
    p.add_argument("--conv-kernels", "--conv-grad", choices=["auto", "xla", "matmul"],
                   default="auto")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temp dir)")
    a = p.parse_args(argv)

    import jax
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import make_step
    from cnn_jax.provenance import hardware, versions

    fn, state, data, kernels = make_step(a.model, a.batch, a.dtype, a.steps_per_call,
                                         a.conv_kernels, a.seeds)
    for _ in range(2):  # compile + warm-up
        state, _ = fn(state, data)
    jax.block_until_ready(state)
    untraced = []  # the same calls without the profiler, for its overhead
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(a.calls):
            state, _ = fn(state, data)
        jax.block_until_ready(state)
        untraced.append(1000 * (time.perf_counter() - t) / (a.calls * a.steps_per_call))
    folder = Path(a.trace_dir or tempfile.mkdtemp(prefix="profile_step-"))
    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        t = time.perf_counter()
        for _ in range(a.calls):
            state, _ = fn(state, data)
        jax.block_until_ready(state)
        wall_ms = 1000 * (time.perf_counter() - t)
    steps = a.calls * a.steps_per_call
    print(json.dumps({
        "model": a.model, "batch": a.batch, "dtype": a.dtype,
        "steps_per_call": a.steps_per_call, "seeds": a.seeds, "conv_kernels": kernels,
        "ms_per_step": statistics.median(untraced), "wall_ms_per_step_traced": wall_ms / steps,
        "tracks": summarise(read_trace(folder), steps, wall_ms, a.top),
        "hardware": hardware(), "versions": versions(),
        "command": "python scripts/profile_step.py "
                   + " ".join(sys.argv[1:] if argv is None else argv)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
