"""What JAX's persistent compilation cache saves: the same command run three times into
new --out folders, with an empty compilation cache (the first run on a machine), with
the cache that run filled (every later run), and with the cache turned off
(CNN_JAX_COMPILATION_CACHE=0). Decoded data and oneDNN kernels are prepared before
the timed runs, so that only compilation differs.

    python scripts/bench_compile_cache.py [--command plain_vs_resnet|train] [--json]

Prints one JSON object: wall seconds of each run and warm / cold.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    # the main experiment's smoke preset: four CIFAR nets, two processes at a time
    "plain_vs_resnet": ["-m", "experiments.plain_vs_resnet", "--preset", "smoke"],
    # one short training run of ResNet-20
    "train": ["-m", "cnn_jax.train", "--model", "resnet20", "--steps", "20", "--batch", "32",
              "--train-subset", "1000", "--eval-subset", "500", "--log-every", "10",
              "--eval-every", "20", "--checkpoint-every", "20", "--workers", "0",
              "--no-progress"],
}


def timed(args: list[str], out: Path, env: dict) -> float:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--command", choices=sorted(COMMANDS), default="plain_vs_resnet")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    args = COMMANDS[a.command]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        off = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        off.update(JAX_PLATFORMS="cpu", CNN_JAX_COMPILATION_CACHE="0")
        on = {**off, "CNN_JAX_COMPILATION_CACHE": "1",
              "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax")}
        timed(args, tmp / "prepare", off)  # data decoded, oneDNN built: not measured
        cold = timed(args, tmp / "cold", on)
        warm = timed(args, tmp / "warm", on)
        off_s = timed(args, tmp / "off", off)
        entries = len(list((tmp / "jax").iterdir()))
    result = {"command": " ".join(["python", *args]), "cold_s": round(cold, 1),
              "warm_s": round(warm, 1), "off_s": round(off_s, 1),
              "warm_over_cold": round(warm / cold, 3), "cache_entries": entries}
    print(json.dumps(result) if a.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
