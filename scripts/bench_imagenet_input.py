"""ImageNet-size training input, side by side in one run on the same images and the
same number of worker processes:

  ours         cnn_jax's input: inception crop (random-resized, area 0.08-1, aspect
               3/4-4/3) at 224 with an antialiased resize, flip, PCA lighting,
               batched by grain into uint8 batches ready for the device (the
               lighting's shift travels as [B, 3])
  torchvision  DataLoader over the same files: RandomResizedCrop(224),
               RandomHorizontalFlip, ToTensor, Normalize (Pillow decodes), float32
  torchvision_v2  DataLoader, transforms.v2 on uint8 tensors: decode_image (libjpeg),
               RandomResizedCrop(224, antialias=True), RandomHorizontalFlip, PCA
               lighting (ImageNet's basis, float32 out)
  dali_cpu     NVIDIA DALI's CPU pipeline (when nvidia-dali-cuda120 is installed):
               decoders.image_random_crop (the same area and aspect ranges), resize
               (antialiased), flip, as many threads as workers; uint8 out
  floor        decoding only, every image whole, by the fastest decoder we found
               (simplejpeg, libjpeg-turbo), in as many processes

    python scripts/bench_imagenet_input.py --data imagenet_sample --workers 2 --json

Each measures images/s over --passes passes of the dataset after a warm-up batch
(workers started). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time

import numpy as np

from cnn_jax.data import ops
from cnn_jax.data.dataset import Dataset
from cnn_jax.data.pipeline import train_dataset
from cnn_jax.data.sources import Source as Records
from cnn_jax.data.sources import open_stored
from cnn_jax.errors import exit_on_bad_input
from cnn_jax.provenance import available_cores, hardware


def ours(records: Records, workers: int, batch: int, batches: int, side: int) -> float:
    dataset = Dataset(records, side, (ops.InceptionCrop(), ops.Flip(), ops.Lighting()))
    it = iter(train_dataset(dataset, batch, seed=0, workers=workers))
    for _ in range(2 * workers + 1):  # warm-up: every worker started, buffers filled
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    assert b["image"].dtype == np.uint8 and b["image"].shape == (batch, side, side, 3)
    rate = batches * batch / (time.perf_counter() - start)
    del it
    return rate


class _TorchImages:
    """The records as torchvision's ImageFolder would give them: PIL images, then its
    transforms (torch imported in the workers through the DataLoader)."""

    def __init__(self, records: Records, side: int):
        import torchvision.transforms as T  # optional: the benchmark's comparison only
        self.records = records
        self.transform = T.Compose([
            T.RandomResizedCrop(side), T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        import io
        from PIL import Image
        data, label = self.records.read(i)
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB")), label


class _TorchV2Images(_TorchImages):
    """transforms.v2 on uint8 tensors, decoded by torchvision.io (libjpeg-turbo)."""

    def __init__(self, records: Records, side: int):
        import torch
        import torchvision.transforms.v2 as T  # optional: the benchmark's comparison only
        self.records = records
        self.transform = T.Compose([T.RandomResizedCrop(side, antialias=True),
                                    T.RandomHorizontalFlip()])
        basis = ops.IMAGENET_PCA
        self.eigen = torch.tensor(basis.eigenvectors * basis.eigenvalues[None] * 255.0,
                                  dtype=torch.float32)

    def __getitem__(self, i):
        import torch
        from torchvision.io import ImageReadMode, decode_image
        data, label = self.records.read(i)
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           mode=ImageReadMode.RGB)
        img = self.transform(img)
        shift = self.eigen @ (0.1 * torch.randn(3))          # PCA lighting
        return img.to(torch.float32) + shift[:, None, None], label


def torchvision_rate(records: Records, workers: int, batch: int, batches: int,
                     side: int, dataset=_TorchImages) -> float:
    import torch  # optional: the benchmark's comparison only
    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        dataset(records, side), batch_size=batch, shuffle=True, num_workers=workers,
        drop_last=True, persistent_workers=workers > 0)
    it = _endless(loader)
    for _ in range(2 * workers + 1):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def dali_cpu_rate(records: Records, workers: int, batch: int, batches: int,
                  side: int) -> tuple:
    """(images/s, None) of DALI's CPU pipeline, or (None, why not)."""
    try:
        from nvidia.dali import fn, pipeline_def, types  # optional benchmark peer
    except ImportError as e:
        return None, f"nvidia-dali-cuda120 is not installed ({e})"
    order = np.random.default_rng(0).permutation(len(records))

    def files():
        k = 0
        while True:
            idx = [order[(k + j) % len(order)] for j in range(batch)]
            k += batch
            reads = [records.read(int(i)) for i in idx]
            yield ([np.frombuffer(d, np.uint8) for d, _ in reads],
                   [np.array(label, np.int32) for _, label in reads])

    @pipeline_def(batch_size=batch, num_threads=max(1, workers), device_id=None,
                  exec_dynamic=True)
    def pipe():
        jpegs, labels = fn.external_source(source=files(), num_outputs=2, dtype=[
            types.UINT8, types.INT32])
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, resize_x=side, resize_y=side, antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        return images, labels
    try:
        p = pipe()
        p.build()
        for _ in range(2):
            p.run()
        start = time.perf_counter()
        for _ in range(batches):
            p.run()
        return batches * batch / (time.perf_counter() - start), None
    except Exception as e:  # a DALI build that cannot run here
        return None, f"DALI's CPU pipeline failed: {type(e).__name__}: {str(e)[:300]}"


def _endless(loader):
    while True:
        yield from loader


def _decode_all(args) -> int:
    import simplejpeg
    from cnn_jax.data.ops import decode
    records, indices = args
    for i in indices:
        data, _ = records.read(int(i))
        try:
            simplejpeg.decode_jpeg(data, "RGB")
        except ValueError:  # PNG or CMYK: Pillow, as the stream does
            decode(data, records.where(int(i)))
    return len(indices)


def floor_rate(records: Records, workers: int, images: int) -> float:
    order = np.random.default_rng(0).permutation(np.resize(np.arange(len(records)), images))
    parts = np.array_split(order, max(1, workers) * 8)
    if workers <= 1:
        start = time.perf_counter()
        done = sum(_decode_all((records, p)) for p in parts)
        return done / (time.perf_counter() - start)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_decode_all, [(records, p[:2]) for p in parts[:workers]])  # started
        start = time.perf_counter()
        done = sum(pool.map(_decode_all, [(records, p) for p in parts], chunksize=1))
        return done / (time.perf_counter() - start)


def versions() -> dict:
    from importlib.metadata import version
    out = {}
    for p in ("jax", "grain", "simplejpeg", "opencv-python-headless", "pillow", "numba", "numpy",
              "torch", "torchvision", "nvidia-dali-cuda120"):
        try:
            out[p] = version(p)
        except Exception:  # an optional peer that is not installed
            out[p] = None
    return out | {"python": platform.python_version()}


@exit_on_bad_input
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="imagenet_sample")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--side", type=int, default=224)
    p.add_argument("--passes", type=float, default=2.0, help="passes over the data each")
    p.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    args = p.parse_args(argv)
    records = open_stored(args.data, "train", args.data_dir)
    batches = max(1, round(args.passes * len(records) / args.batch))
    images = batches * args.batch
    r = {"data": args.data, "images": len(records), "workers": args.workers,
         "batch": args.batch, "side": args.side, "measured_images": images}
    r["ours_img_per_s"] = ours(records, args.workers, args.batch, batches, args.side)
    r["torchvision_img_per_s"] = torchvision_rate(records, args.workers, args.batch, batches,
                                                  args.side)
    r["torchvision_v2_img_per_s"] = torchvision_rate(records, args.workers, args.batch,
                                                     batches, args.side, _TorchV2Images)
    r["dali_cpu_img_per_s"], why = dali_cpu_rate(records, args.workers, args.batch, batches,
                                                 args.side)
    if why:
        r["dali_cpu_missing"] = why
        print(f"dali_cpu: null, {why}", file=sys.stderr)
    r["floor_img_per_s"] = floor_rate(records, args.workers, images)
    r["ratio"] = r["ours_img_per_s"] / r["torchvision_img_per_s"]
    r["ratio_v2"] = r["ours_img_per_s"] / r["torchvision_v2_img_per_s"]
    r["ratio_dali_cpu"] = (r["ours_img_per_s"] / r["dali_cpu_img_per_s"]
                           if r["dali_cpu_img_per_s"] else None)
    r["floor_over_ours"] = r["floor_img_per_s"] / r["ours_img_per_s"]
    r.update(decoder="simplejpeg (libjpeg-turbo, DCT scaling 1/2-1/8), antialiased resize "
                     "(Pillow's resample compiled by numba when shrinking, OpenCV's bilinear "
                     "when enlarging)",
             torchvision_decoder="Pillow", cores=available_cores(), hardware=hardware(),
             versions=versions())
    if not args.json:
        print(f"{args.workers} worker(s): ours {r['ours_img_per_s']:.0f} img/s, torchvision "
              f"{r['torchvision_img_per_s']:.0f} ({r['ratio']:.2f}x), transforms.v2 "
              f"{r['torchvision_v2_img_per_s']:.0f} ({r['ratio_v2']:.2f}x), DALI CPU "
              f"{r['dali_cpu_img_per_s'] or 'n/a'}, decode-only floor "
              f"{r['floor_img_per_s']:.0f} ({r['floor_over_ours']:.2f}x ours)", file=sys.stderr)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
