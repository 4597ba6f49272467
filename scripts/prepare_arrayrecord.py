"""Write an ImageFolder (folder or uncompressed tar) as ArrayRecord shards: the format
to copy to every host's local disk of a pod or cluster, read at random by grain.

    python scripts/prepare_arrayrecord.py --data imagenet_sample --out /data/in_sample --shards 8
    python scripts/prepare_arrayrecord.py --data /path/to/imagenet --out /data/imagenet --shards 1024
    python -m cnn_jax.train --data arrayrecord:/data/imagenet --augment resnet ...

Each record is the label (int32, little-endian) then the image file's bytes exactly as
they were (no re-encoding); `<split>_labels.npy` and `dataset.json` (classes, splits,
shards) sit beside the shards. Every split the folder has is written; records keep the
folder's sorted order, so indices, and hence runs, are the same as from the folder.
dataset.json is written last: a folder without it is an unfinished one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from cnn_jax.data.sources import (DATASET_FILE, SPLITS, MissingSplit, open_stored,
                                  write_arrayrecord)
from cnn_jax.errors import BadInput, exit_on_bad_input


def source_name(data: str) -> str:
    """A path is an ImageFolder; anything else a dataset name (imagenet_sample)."""
    return f"imagefolder:{data}" if Path(data).expanduser().exists() else data


@exit_on_bad_input
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="an ImageFolder folder or uncompressed .tar, or imagenet_sample")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="a new or empty folder for the shards")
    p.add_argument("--shards", type=int, default=16, help="files per split (default 16)")
    args = p.parse_args(argv)
    if args.shards < 1:
        raise BadInput(f"--shards must be positive; got {args.shards}")
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"--out {out}: not empty; choose a new folder (nothing was written)")
    name = source_name(args.data)
    splits = {}
    for split in SPLITS:
        try:
            splits[split] = open_stored(name, split, args.data_dir)
        except MissingSplit:
            continue
    if not splits:
        raise BadInput(f"--data {args.data}: no train/, val/ or test/ images found")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": args.data, "classes": next(iter(splits.values())).classes, "splits": {}}
    for split, records in splits.items():
        if len(records) < args.shards:
            raise BadInput(f"--shards {args.shards}: more shards than the {len(records)} "
                           f"images of '{split}'")
        bar = tqdm(total=len(records), unit="img", desc=f"writing {split}")
        shards = write_arrayrecord(records, out, split, args.shards, on_record=lambda: bar.update())
        bar.close()
        meta["splits"][split] = {"shards": shards, "n": len(records)}
    tmp = out / f".{DATASET_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / DATASET_FILE)
    counts = ", ".join(f"{s} {m['n']:,}" for s, m in meta["splits"].items())
    print(f"wrote {out}: {counts} images in {args.shards} shard(s) per split; train with "
          f"--data arrayrecord:{out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
