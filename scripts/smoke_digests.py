"""The results digests of every experiment's smoke preset (and of one short
`cnn_jax.train` run): what a refactor meant to keep behaviour must leave unchanged.

    python scripts/smoke_digests.py --out /tmp/digests-before [--only plain_vs_resnet ...]
    # change the code, then
    python scripts/smoke_digests.py --out /tmp/digests-after --compare /tmp/digests-before/digests.json

Each experiment runs as a user would run it (`python -m experiments.NAME --preset
smoke --out OUT/NAME`, the data found where the project finds it); afterwards every
results.json under OUT that holds a `final_params_digest` (and every transfer mode's
`val_accuracy`) is collected into OUT/digests.json, keyed by its path below OUT. The
last line printed is that JSON object, or with --compare the keys that differ.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

EXPERIMENTS = ("plain_vs_resnet", "lenet_mnist", "zoo_cifar", "augmentation_ablation",
               "identity_blocks", "layer_responses", "ensembles", "transfer_learning")
TRAIN = ["--model", "resnet8", "--data", "cifar10", "--steps", "6", "--batch", "16",
         "--train-subset", "256", "--eval-subset", "200", "--log-every", "2",
         "--eval-every", "3", "--checkpoint-every", "3", "--seed", "3", "--workers", "0"]


def run(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed with exit code {r.returncode}; see {log}")
    return time.perf_counter() - start


def collect(out: Path) -> dict:
    digests = {}
    for f in sorted(out.rglob("results.json")) + sorted(out.rglob("result.json")):
        r = json.loads(f.read_text())
        key = str(f.parent.relative_to(out))
        if "final_params_digest" in r:
            digests[key] = r["final_params_digest"]
        elif "val_accuracy" in r:
            digests[key] = r["val_accuracy"]
    return digests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS + ("train",), default=None)
    p.add_argument("--compare", type=Path, default=None, help="digests.json of another tree")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.only or EXPERIMENTS + ("train",):
        if name == "train":
            cmd = ["cnn_jax.train", *TRAIN, "--out", str(a.out / "train")]
        else:
            cmd = [f"experiments.{name}", "--preset", "smoke", "--out", str(a.out / name)]
        wall = run(cmd, a.out / f"{name}.log")
        print(f"{name}: {wall:.0f} s", file=sys.stderr)
    digests = collect(a.out)
    (a.out / "digests.json").write_text(json.dumps(digests, indent=1))
    if a.compare is None:
        print(json.dumps(digests))
        return 0
    before = json.loads(a.compare.read_text())
    keys = sorted(set(before) & set(digests)) if a.only else sorted(set(before) | set(digests))
    differ = [k for k in keys if before.get(k) != digests.get(k)]
    print(json.dumps({"compared": len(keys), "differ": differ}))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
