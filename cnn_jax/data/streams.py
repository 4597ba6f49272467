"""The papers' ImageNet transforms, on each image's original pixels, in the workers.

A training view is a box in the original image's coordinates, drawn per augmentation,
then cut from the decoded pixels and resized to the network's input side S:

    resnet     He et al. 2015, Sec. 3.4: shorter side resized to a random length in
               [256, 480] (scaled by S / 224), a random S x S crop, flip, and
               Krizhevsky's PCA lighting
    inception  Szegedy et al. 2015 as torchvision, timm and flax's ImageNet example
               have it: area 8-100 % of the image, aspect ratio 3/4-4/3 (log-uniform,
               ten tries, then the centre), resized to S x S, flip
    alexnet    Krizhevsky et al. 2012, Sec. 2 and 4.1: the central square scaled to
               256 x 256 (by S / 224), a random S x S crop, flip, PCA lighting
    center     no augmentation: the single test view below at every epoch (a net
               fitting fixed images tests optimisation, as Fig. 4's training error does)

Decoding is libjpeg-turbo's (simplejpeg) with DCT-domain scaling: the image is decoded
at the smallest of the scales 1, 1/2, 1/4, 1/8 that keeps the box at least S pixels,
so no more pixels are decoded than the crop needs and the resize (OpenCV, bilinear,
uint8) then shrinks by less than 2x. Files libjpeg-turbo cannot read (PNG named .JPEG,
CMYK) go through Pillow. Grayscale becomes RGB. Images leave the workers as uint8;
the lighting is a per-image RGB shift [B, 3] added on the device before normalising.

Every draw is `uniforms(seed, epoch, index, stream)` of cnn_jax.data.augment, so a
batch depends on nothing but the seed, the epoch and the examples' indices.

Test views (`PROTOCOLS`): `single` (shorter side 256 / 224 * S, the centre S x S),
`ten` (its four corners and centre, each mirrored: AlexNet's and the ResNet paper's
10-crop), and `multiscale` (the ResNet paper's fully-convolutional test: the whole
image at shorter sides {224, 256, 384, 480, 640} / 224 * S, scores averaged).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
from typing import Optional

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from cnn_jax.data.augment import (AUGMENTS, STREAM_AUGMENTS, STREAM_CROP, STREAM_FLIP,
                                  STREAM_PCA, PCABasis, normals, pca_shift, uniforms)
from cnn_jax.data.keys import IMAGE, LABEL, SHIFT, SKIPPED
from cnn_jax.data.records import Records
from cnn_jax.data.sources import DataError

log = logging.getLogger(__name__)
cv2.setNumThreads(1)  # one worker process, one thread: the workers are the parallelism

LIGHTING = ("resnet", "alexnet")         # the augmentations that include PCA lighting
PROTOCOLS = ("single", "ten", "multiscale")
EVAL_RESIZE = 256 / 224                  # shorter side 256 for a 224 crop
MULTISCALE = (224, 256, 384, 480, 640)   # He et al. 2015, Sec. 3.4 (for S = 224)
# longer : shorter side of a multi-scale view, rounded to these so that images of
# nearly the same shape batch together (ImageNet's 4:3 and 3:2 are exact)
ASPECTS = (1.0, 1.25, 4 / 3, 1.5, 5 / 3, 2.0)

# fb.resnet.torch (datasets/imagenet.lua): ImageNet's RGB eigenvalues and eigenvectors
# (columns; rows R, G, B) for pixels in [0, 1], as everyone uses them
IMAGENET_PCA = PCABasis(np.array([0.2175, 0.0188, 0.0045]),
                        np.array([[-0.5675, 0.7192, 0.4009],
                                  [-0.5808, -0.0045, -0.8140],
                                  [-0.5836, -0.6948, 0.4203]]))
LIGHTING_STD = 0.1



# ------------------------------------------------------------------ decoding
def image_size(data: bytes, where: str) -> tuple[int, int]:
    """(height, width) from the header alone."""
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return h, w
    except ValueError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[1], im.size[0]
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{where}: not an image ({type(e).__name__}: {e})") from None


def _scale(data: bytes, min_hw) -> dict:
    """simplejpeg's size bounds for the largest power-of-two reduction (1/2, 1/4, 1/8)
    that keeps min_hw: libjpeg-turbo's other DCT scales (7/8, 3/4, ...) decode slower
    than the full image."""
    if min(min_hw) <= 0:  # no bound: the whole image
        return {}
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    f = 1
    while f < 8 and h / (2 * f) >= min_hw[0] and w / (2 * f) >= min_hw[1]:
        f *= 2
    return {"min_height": math.ceil(h / f), "min_width": math.ceil(w / f)} if f > 1 else {}


def decode(data: bytes, where: str, min_hw: tuple[int, int] = (0, 0)) -> np.ndarray:
    """uint8 [h, w, 3], at the smallest DCT scale with h >= min_hw[0], w >= min_hw[1]."""
    try:
        return simplejpeg.decode_jpeg(data, "RGB", **_scale(data, min_hw))
    except ValueError:  # not a baseline/progressive YCbCr or gray JPEG, or damaged
        pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and min(min_hw) > 0:  # Pillow's DCT scaling (CMYK)
                im.draft(im.mode, (int(min_hw[1]), int(min_hw[0])))
            return np.asarray(im.convert("RGB"), np.uint8)
    except Exception as e:
        raise DataError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None


def decode_box(data: bytes, where: str, box, out_hw: tuple[int, int],
               size: Optional[tuple] = None) -> np.ndarray:
    """The box (top, left, height, width) of the original image (of `size`, read from
    the header when not given), resized to out_hw."""
    top, left, h, w = box
    size = size or image_size(data, where)
    need = (math.ceil(size[0] * out_hw[0] / h), math.ceil(size[1] * out_hw[1] / w))
    img = decode(data, where, need)
    sy, sx = img.shape[0] / size[0], img.shape[1] / size[1]
    y0, x0 = int(top * sy), int(left * sx)
    y1 = max(y0 + 1, min(img.shape[0], round((top + h) * sy)))
    x1 = max(x0 + 1, min(img.shape[1], round((left + w) * sx)))
    return cv2.resize(img[y0:y1, x0:x1], (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------ training boxes
def resnet_box(hw, side: int, u) -> tuple:
    """Shorter side to U[256, 480] * side / 224, a random side x side crop. u: [3]."""
    shorter = (256 + math.floor(u[0] * 225)) * side / 224   # an integer length for S = 224
    crop = side * min(hw) / shorter  # the crop's side in original pixels
    return (u[1] * (hw[0] - crop), u[2] * (hw[1] - crop), crop, crop)


def inception_box(hw, side: int, u, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """torchvision's RandomResizedCrop.get_params, drawing from u: [40]."""
    H, W = hw
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        a, r, y, x = u[4 * t: 4 * t + 4]
        target = H * W * (area[0] + a * (area[1] - area[0]))
        aspect = math.exp(log_ratio[0] + r * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            return (int(y * (H - h + 1)), int(x * (W - w + 1)), h, w)
    if W / H < ratio[0]:
        w, h = W, round(W / ratio[0])
    elif W / H > ratio[1]:
        h, w = H, round(H * ratio[1])
    else:
        h, w = H, W
    return ((H - h) // 2, (W - w) // 2, h, w)


def alexnet_box(hw, side: int, u) -> tuple:
    """The central square as 256 x 256 (scaled by side / 224), a random side x side
    crop of it. u: [2]."""
    m = min(hw)
    crop = m * 224 / 256
    return ((hw[0] - m) / 2 + u[0] * (m - crop), (hw[1] - m) / 2 + u[1] * (m - crop), crop, crop)


BOXES = {"resnet": (resnet_box, 3), "inception": (inception_box, 40),
         "alexnet": (alexnet_box, 2)}


# ------------------------------------------------------------------ test views
def single_view(data: bytes, where: str, side: int) -> np.ndarray:
    """Shorter side to 256 / 224 * side, the centre side x side (10-crop's centre)."""
    img = resized_shorter(data, where, round(side * EVAL_RESIZE))
    top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    return img[top:top + side, left:left + side]


def resized_shorter(data: bytes, where: str, shorter: int, aspects=None) -> np.ndarray:
    """The whole image with its shorter side `shorter`; the longer side kept in
    proportion, or (aspects) rounded to the nearest of those ratios."""
    H, W = image_size(data, where)
    scale = shorter / min(H, W)
    longer = max(H, W) * scale
    if aspects is not None:
        longer = shorter * min(aspects, key=lambda a: abs(a * shorter - longer))
    longer = max(shorter, round(longer))
    out = (shorter, longer) if H <= W else (longer, shorter)
    return decode_box(data, where, (0, 0, H, W), out, (H, W))


def ten_views(data: bytes, where: str, side: int) -> np.ndarray:
    """[10, side, side, 3]: corners and centre of the image at shorter side 256 / 224 *
    side, then the same five mirrored (cnn_jax.data.augment.ten_crop's order)."""
    img = resized_shorter(data, where, round(side * EVAL_RESIZE))
    h, w = img.shape[:2]
    corners = [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side),
               ((h - side) // 2, (w - side) // 2)]
    five = [img[t:t + side, l:l + side] for t, l in corners]
    return np.stack(five + [v[:, ::-1] for v in five])


def multiscale_views(data: bytes, where: str, side: int) -> list[np.ndarray]:
    return [resized_shorter(data, where, round(s * side / 224), ASPECTS) for s in MULTISCALE]


# ------------------------------------------------------------------ the stream
@dataclasses.dataclass(frozen=True)
class Stream:
    """A split that streams: its records, and how to turn them into network inputs."""

    records: Records
    side: int                      # the network's input side S
    augment: str = "inception"     # one of STREAM_AUGMENTS
    lighting: bool = False         # PCA lighting (on for resnet and alexnet)
    bad_images: str = "refuse"     # refuse: stop, naming the file; skip: use the next one

    @property
    def classes(self) -> list:
        return self.records.classes

    @property
    def labels(self) -> np.ndarray:
        return self.records.labels

    @property
    def image_shape(self) -> tuple:
        return (self.side, self.side, 3)

    def __len__(self) -> int:
        return len(self.records)

    def _readable(self, i: int, view):
        """view(data, where) of record i; with bad_images=skip, of the first readable
        record after it (and how many were passed over)."""
        for passed in range(len(self)):
            j = (i + passed) % len(self)
            data, label = self.records.read(j)
            try:
                return view(data, self.records.where(j)), label, passed
            except DataError as e:
                if self.bad_images != "skip":
                    raise DataError(f"record {j}: {e} (--bad-images skip passes over "
                                    f"unreadable files)") from None
                log.warning("skipping record %d: %s", j, e)
        raise DataError(f"{self.records.source}: no readable image at all")

    def train_batch(self, index: np.ndarray, epoch: np.ndarray, seed: int) -> dict:
        if self.augment == "center":
            return self.eval_batch(index)
        box, n = BOXES[self.augment]
        u = uniforms(seed, epoch, index, STREAM_CROP, n)
        flip = uniforms(seed, epoch, index, STREAM_FLIP, 1)[:, 0] < 0.5
        images = np.empty((len(index), self.side, self.side, 3), np.uint8)
        labels = np.empty(len(index), np.int32)
        skipped = 0
        for k, i in enumerate(index):
            def view(data, where, k=k):
                hw = image_size(data, where)
                return decode_box(data, where, box(hw, self.side, u[k]), (self.side, self.side),
                                  hw)
            img, labels[k], passed = self._readable(int(i), view)
            images[k] = img[:, ::-1] if flip[k] else img
            skipped += passed
        out = {IMAGE: images, LABEL: labels, SKIPPED: np.int64(skipped)}
        if self.lighting:
            alphas = LIGHTING_STD * normals(seed, epoch, index, STREAM_PCA, 3)
            out[SHIFT] = pca_shift(IMAGENET_PCA, alphas).astype(np.float32)
        return out

    def eval_batch(self, index: np.ndarray, protocol: str = "single") -> dict:
        """single: [B, S, S, 3]; ten: [B, 10, S, S, 3]; multiscale: a list per image
        of its five views (their shapes differ)."""
        s = self.side
        views = {"single": lambda d, w: single_view(d, w, s),
                 "ten": lambda d, w: ten_views(d, w, s),
                 "multiscale": lambda d, w: multiscale_views(d, w, s)}[protocol]
        read = [self._readable(int(i), views) for i in index]
        images = [r[0] for r in read] if protocol == "multiscale" else np.stack([r[0] for r in read])
        return {IMAGE: images, LABEL: np.array([r[1] for r in read], np.int32),
                SKIPPED: np.int64(sum(r[2] for r in read))}

    def sample(self, n: int = 500) -> np.ndarray:
        """Single views of a fixed spread of up to n training images: what a
        normaliser of a stream is estimated from."""
        index = np.unique(np.linspace(0, len(self) - 1, min(n, len(self))).astype(int))
        return self.eval_batch(index)["image"]


def check_augment(augment: str, streaming: bool, data: str) -> Optional[str]:
    """None, or what is wrong with --augment for this dataset."""
    if augment not in AUGMENTS:
        return f"must be one of {', '.join(AUGMENTS)}; got {augment!r}"
    if streaming and augment == "cifar":
        return (f"{data} streams full-size images of every size; choose one of the ImageNet "
                f"augmentations {', '.join(STREAM_AUGMENTS)}")
    return None
