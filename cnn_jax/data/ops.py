"""Preprocessing as named ops, each defined once, that recipes compose.

A training recipe (RECIPES, below) is a list of op names, in order, as the papers
describe their preprocessing; every op is one registered class (`register`) with one
interface (`Op`): its random draws, what it does to one image, optionally the same on a
whole batch of one size (proven equal in the tests), and what it decided (for
`python -m cnn_jax.preview`). A new op is one class and its name in a recipe.

    geometry   pad_crop             He et al. 2015 Sec. 4.2 (CIFAR): pad by 4, a random crop
               scale_crop           He et al. 2015 Sec. 3.4: shorter side to U[256, 480] * S / 224,
                                    an S x S crop
               random_resized_crop  Szegedy et al. 2015 as torchvision's RandomResizedCrop
               alexnet_crop         Krizhevsky et al. 2012: the central square as 256 x 256,
                                    an S x S crop
               center_view          no augmentation: the single test view at every epoch
               pad                  zero padding (--input-pad: MNIST's 28 to LeNet's 32)
    flip       mirror left-right with probability 1/2
    colour     colour_shift (uniform per-channel offsets, the lecture's "R+20, G-20") and
               lighting (Krizhevsky's PCA lighting): per-image RGB shifts

Random numbers come from `uniforms(seed, epoch, index, stream)`, a counter-based hash
(splitmix64) rather than a stateful generator, so a batch depends on nothing but the
seed, the epochs and the examples' indices, whatever the batch size, worker count or
resume point; each op has its own stream.

Training crops of encoded full-size images decode at the smallest DCT scale that keeps
the crop's resolution (libjpeg-turbo via simplejpeg; the op option `fast_decode`), then
resize with antialiasing (`resize`: Pillow's filter, compiled). The test views (center,
ten, multiscale) are exactly torchvision's: PIL's decode and antialiased bilinear resize.
Pixel scale: uint8 [0, 255]; colour ops return float32 in the same units, unclipped.
"""
from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from cnn_jax.data.resample import resample
from cnn_jax.errors import BadInput, DataError

cv2.setNumThreads(1)  # one worker process, one thread: the workers are the parallelism

BAD_IMAGES = ("refuse", "skip")   # --bad-images: stop naming the file, or leave it out
NORMALISATIONS = ("per_pixel", "per_channel", "standard", "lecun", "imagenet", "inception",
                  "source", "none")  # cnn_jax.train.inputs.make_normaliser
VIEWS = ("1", "2", "10", "multiscale")
EVAL_RESIZE = 256 / 224                  # test views: shorter side 256 for a 224 crop
MULTISCALE = (224, 256, 384, 480, 640)   # He et al. 2015, Sec. 3.4 (for S = 224)
# multi-scale views keep their aspect ratio within ASPECT_STEP / 2 (never stretched
# more): longer sides are rounded to this geometric grid so that images of nearly the
# same shape batch together
ASPECT_STEP = 1.02


# ------------------------------------------------------------------ randomness
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# one stream per op (stream 2 was a random-resized crop's; numbers stay as they were)
STREAM_CROP, STREAM_FLIP, STREAM_SHIFT, STREAM_PCA = 0, 1, 3, 4


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch, index, stream: int, n: int) -> np.ndarray:
    """[B, n] floats in [0, 1), one row per example, fixed by (seed, epoch, index, stream)."""
    index = np.asarray(index, np.uint64).reshape(-1)
    epoch = np.broadcast_to(np.asarray(epoch, np.uint64), index.shape)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) ^ _splitmix64(np.uint64(stream)))
        key = _splitmix64(key ^ _splitmix64(epoch))
        key = _splitmix64(key ^ index)
        draws = _splitmix64(key[:, None] ^ _splitmix64(np.arange(n, dtype=np.uint64))[None])
    return (draws >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ------------------------------------------------------------------ decoding and resizing
def image_size(data, where: str) -> tuple[int, int]:
    """(height, width) of a decoded image, or of an encoded one from its header alone."""
    if isinstance(data, np.ndarray):
        return data.shape[:2]
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


def decode(data, where: str, min_hw: tuple[int, int] = (0, 0)) -> np.ndarray:
    """uint8 [h, w, 3], at the smallest DCT scale with h >= min_hw[0], w >= min_hw[1].
    JPEGs libjpeg-turbo reads (also CMYK and grayscale ones) go through simplejpeg,
    anything else (PNG named .JPEG, ...) through Pillow. Decoded pixels pass as they
    are (grayscale ones become RGB)."""
    if isinstance(data, np.ndarray):
        return np.repeat(data, 3, axis=-1) if data.shape[-1] == 1 else data
    try:
        return simplejpeg.decode_jpeg(data, "RGB", **_scale(data, min_hw))
    except ValueError:  # not a JPEG, or damaged
        pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except Exception as e:
        raise DataError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None


def resize(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear. Shrinking is antialiased exactly as PIL's resize and torchvision's
    antialias=True are (the triangle filter widened by the factor: `resample`; OpenCV's
    INTER_AREA is a box filter, 26-36 dB away at 2x); enlarging is OpenCV's bilinear,
    the same filter and faster."""
    if img.shape[:2] == tuple(out_hw):
        return img
    if out_hw[0] >= img.shape[0] and out_hw[1] >= img.shape[1]:
        out = cv2.resize(img, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)
        return out.reshape(*out_hw, img.shape[-1])
    return resample(img, out_hw)


def cut(data, where: str, box, out_hw: tuple[int, int], size: Optional[tuple] = None,
        fast: bool = True) -> np.ndarray:
    """The box (top, left, height, width) of the original image (of `size`, read from
    the header when not given), resized to out_hw. `fast` (training crops): an encoded
    image is decoded only at the resolution the box needs (libjpeg-turbo's DCT
    scaling), the box rounded to whole pixels there. Otherwise (the test views) exactly
    as PIL and torchvision do it (`exact_cut`): the whole image decoded by PIL, cropped,
    then PIL's antialiased bilinear resize."""
    if not fast:
        return exact_cut(data, where, box, out_hw)
    top, left, h, w = box
    size = size or image_size(data, where)
    need = (math.ceil(size[0] * out_hw[0] / h), math.ceil(size[1] * out_hw[1] / w))
    img = decode(data, where, need)
    sy, sx = img.shape[0] / size[0], img.shape[1] / size[1]
    y0, x0 = int(top * sy), int(left * sx)
    y1 = max(y0 + 1, min(img.shape[0], round((top + h) * sy)))
    x1 = max(x0 + 1, min(img.shape[1], round((left + w) * sx)))
    return resize(img[y0:y1, x0:x1], out_hw)


def pil_image(data, where: str) -> Image.Image:
    """An image as PIL holds it: decoded by PIL and converted to RGB (torchvision's
    ImageFolder loader), or decoded pixels as they are."""
    if isinstance(data, np.ndarray):
        return Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None


def exact_cut(data, where: str, box, out_hw: tuple[int, int]) -> np.ndarray:
    """PIL's crop of the box (rounded to whole pixels as `cut` rounds it) of the whole
    decoded image, then PIL's bilinear resize, antialiased when shrinking: for a
    whole-image box, torchvision's Resize on a PIL image, pixel for pixel."""
    top, left, h, w = box
    im = pil_image(data, where)
    y0, x0 = int(top), int(left)
    y1, x1 = max(y0 + 1, min(im.height, round(top + h))), max(x0 + 1, min(im.width, round(left + w)))
    if (y0, x0, y1, x1) != (0, 0, im.height, im.width):
        im = im.crop((x0, y0, x1, y1))
    out = np.asarray(im.resize((out_hw[1], out_hw[0]), Image.BILINEAR), np.uint8)
    return out[..., None] if out.ndim == 2 else out


def shorter_side(hw, shorter: int) -> tuple[int, int]:
    """(H, W) with the shorter side `shorter` and the longer one in proportion,
    truncated as torchvision's Resize(int) does."""
    h, w = hw
    if h <= w:
        return shorter, int(shorter * w / h)
    return int(shorter * h / w), shorter


def centre(hw, side: int) -> tuple[int, int]:
    """(top, left) of the centred side x side crop, rounded as torchvision's CenterCrop."""
    return int(round((hw[0] - side) / 2.0)), int(round((hw[1] - side) / 2.0))


# ------------------------------------------------------------------ training crops
def pad(images: np.ndarray, amount: int) -> np.ndarray:
    """Zero-pad a batch [B, H, W, C] (or one image [H, W, C]) on every side."""
    spatial = ((amount, amount), (amount, amount), (0, 0))
    return np.pad(images, ((0, 0), *spatial) if images.ndim == 4 else spatial)


def gather_crops(images: np.ndarray, top: np.ndarray, left: np.ndarray, h: int, w: int
                 ) -> np.ndarray:
    """Per-image crops [B, h, w, C] at the given corners, by one fancy-indexing gather."""
    b = np.arange(len(images))[:, None, None]
    rows = (top[:, None] + np.arange(h))[:, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, :]
    return images[b, rows, cols]


# ------------------------------------------------------------------ the op interface
OPS: dict = {}   # name -> Op class: every op a recipe can name


def register(cls):
    """Make an op nameable in RECIPES (and in the data section's recipe)."""
    OPS[cls.name] = cls
    return cls


@dataclasses.dataclass
class Picture:
    """An image on its way through a recipe: its record (encoded bytes, decoded no
    further than a crop needs, or decoded pixels), where it came from, its size."""
    data: object
    where: str
    hw: tuple

    @classmethod
    def of(cls, record, where: str) -> "Picture":
        return cls(record, where, tuple(image_size(record, where)))


def pixels(image) -> np.ndarray:
    """An op's input as pixels: a Picture decoded whole, or pixels as they are."""
    return decode(image.data, image.where) if isinstance(image, Picture) else image


class Op:
    """One step of a training recipe, the same for every image source.

    Its random numbers: `draws` uniforms per image from its own `stream`
    (`uniforms(seed, epoch, index, stream, draws)`), so that an op switched on or off
    leaves the others' draws unchanged. `one(image, u, side)`: one image (a Picture,
    or pixels from the op before) with its row of draws; `batch(images, u)`: the same
    on a whole batch of one size [B, H, W, C] (None where the op has no such form;
    tests/test_data.py proves each equal to `one`); `decided(u, hw, side)`: what it
    chose for one image, in words a person reads (`python -m cnn_jax.preview --json`).
    `colour` ops add one RGB offset per image (`shift`), which encoded images send to
    the device instead (a uint8 transfer); `resamples`: a crop that delivers side S
    from any size (zero padding of the input, --input-pad, follows it)."""

    name = ""
    stream = -1
    draws = 0
    colour = False
    resamples = False
    batch = None

    @classmethod
    def of(cls, spec) -> "Op":
        """The op as the data section (cnn_jax.data.dataset.DataSpec) configures it."""
        return cls()

    def one(self, image, u, side: int):
        raise NotImplementedError

    def decided(self, u, hw, side: int) -> dict:
        return {}


# ------------------------------------------------------------------ geometry
@register
@dataclasses.dataclass(frozen=True)
class Pad(Op):
    """Zero padding by `amount` on every side (LeNet's MNIST, 28 -> 32): --input-pad."""
    amount: int = 0
    name = "pad"

    @classmethod
    def of(cls, spec):
        return cls(spec.input_pad)

    def one(self, image, u, side):
        return pad(pixels(image), self.amount)

    def batch(self, images, u):
        return pad(images, self.amount)


@register
@dataclasses.dataclass(frozen=True)
class PadCrop(Op):
    """He et al. 2015 Sec. 4.2: pad by `amount` zeros, a random crop of the original size."""
    amount: int = 4
    name = "pad_crop"
    stream = STREAM_CROP
    draws = 2

    @classmethod
    def of(cls, spec):
        return cls(spec.crop_pad)

    def offsets(self, u: np.ndarray) -> np.ndarray:
        return np.floor(u * (2 * self.amount + 1)).astype(np.int64)

    def one(self, image, u, side=None):
        img = pixels(image)
        t, l = self.offsets(u)
        return pad(img, self.amount)[t:t + img.shape[0], l:l + img.shape[1]]

    def batch(self, images, u):
        o = self.offsets(u)
        return gather_crops(pad(images, self.amount), o[:, 0], o[:, 1], *images.shape[1:3])

    def decided(self, u, hw, side):
        t, l = (int(v) for v in self.offsets(np.asarray(u)))
        return {"crop": [t - self.amount, l - self.amount, int(hw[0]), int(hw[1])]}


@dataclasses.dataclass(frozen=True)
class BoxCrop(Op):
    """A crop of the original image given as a box (top, left, height, width) and
    resized to side S. `fast_decode`: decode a JPEG at the smallest DCT scale that keeps
    the box's resolution (libjpeg-turbo), not whole: 2-4x faster on ImageNet's photos
    and a few dB from whole-image decoding on some (docs/deviations.md); training only,
    the test views decode whole."""
    fast_decode: bool = True
    stream = STREAM_CROP
    resamples = True

    def box(self, hw, side: int, u) -> tuple:
        raise NotImplementedError

    def one(self, image, u, side):
        image = image if isinstance(image, Picture) else Picture(image, "", image.shape[:2])
        return cut(image.data, image.where, self.box(image.hw, side, u), (side, side),
                   image.hw, fast=self.fast_decode)

    def decided(self, u, hw, side):
        return {"crop": [round(float(v), 2) for v in self.box(hw, side, np.asarray(u))]}


@register
@dataclasses.dataclass(frozen=True)
class ScaleCrop(BoxCrop):
    """He et al. 2015 Sec. 3.4: shorter side to U[256, 480] * side / 224, a random
    side x side crop."""
    name = "scale_crop"
    draws = 3

    def box(self, hw, side: int, u) -> tuple:
        shorter = (256 + math.floor(u[0] * 225)) * side / 224   # an integer for S = 224
        crop = side * min(hw) / shorter  # the crop's side in original pixels
        return (u[1] * (hw[0] - crop), u[2] * (hw[1] - crop), crop, crop)


@register
@dataclasses.dataclass(frozen=True)
class InceptionCrop(BoxCrop):
    """torchvision's RandomResizedCrop.get_params (area, log-uniform ratio, ten tries,
    then the centre), drawing from u: [40]."""
    area: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    name = "random_resized_crop"
    draws = 40

    def box(self, hw, side: int, u) -> tuple:
        H, W = hw
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for t in range(10):
            a, r, y, x = u[4 * t: 4 * t + 4]
            target = H * W * (self.area[0] + a * (self.area[1] - self.area[0]))
            aspect = math.exp(log_ratio[0] + r * (log_ratio[1] - log_ratio[0]))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= W and 0 < h <= H:
                return (int(y * (H - h + 1)), int(x * (W - w + 1)), h, w)
        if W / H < self.ratio[0]:
            w, h = W, round(W / self.ratio[0])
        elif W / H > self.ratio[1]:
            h, w = H, round(H * self.ratio[1])
        else:
            h, w = H, W
        return ((H - h) // 2, (W - w) // 2, h, w)


@register
@dataclasses.dataclass(frozen=True)
class AlexNetCrop(BoxCrop):
    """Krizhevsky et al. 2012 Sec. 2 and 4.1: the central square as 256 x 256 (scaled
    by side / 224), a random side x side crop of it."""
    name = "alexnet_crop"
    draws = 2

    def box(self, hw, side: int, u) -> tuple:
        m = min(hw)
        crop = m * 224 / 256
        return ((hw[0] - m) / 2 + u[0] * (m - crop), (hw[1] - m) / 2 + u[1] * (m - crop),
                crop, crop)


@register
@dataclasses.dataclass(frozen=True)
class CenterView(BoxCrop):
    """No augmentation: the single test view (the centre S x S of the image at shorter
    side 256 / 224 * S; an image of side S itself) at every epoch."""
    name = "center_view"
    stream = -1
    draws = 0

    def one(self, image, u, side):
        image = image if isinstance(image, Picture) else Picture(image, "", image.shape[:2])
        return ten_views(view_source(image.data, image.where, side, 0, exact=not self.fast_decode),
                         side)[CENTRE]

    def decided(self, u, hw, side):
        if tuple(hw) == (side, side):
            return {"crop": [0, 0, side, side]}
        h, w = shorter_side(hw, round(side * EVAL_RESIZE))
        t, l = centre((h, w), side)
        return {"crop": [round(t * hw[0] / h, 2), round(l * hw[1] / w, 2),
                         round(side * hw[0] / h, 2), round(side * hw[1] / w, 2)]}


@register
@dataclasses.dataclass(frozen=True)
class Flip(Op):
    """Mirror left-right where u < 0.5."""
    name = "flip"
    stream = STREAM_FLIP
    draws = 1

    def one(self, image, u, side=None):
        img = pixels(image)
        return img[:, ::-1] if u[0] < 0.5 else img

    def batch(self, images, u):
        return np.where((u[:, 0] < 0.5)[:, None, None, None], images[:, :, ::-1], images)

    def decided(self, u, hw, side):
        return {"flipped": bool(u[0] < 0.5)}


# ------------------------------------------------------------------ colour
class Colour(Op):
    """An offset per channel of each image (float32 out, unclipped)."""
    colour = True

    def shift(self, u: np.ndarray, channels: int) -> np.ndarray:
        raise NotImplementedError

    def one(self, image, u, side=None):
        img = pixels(image)
        return add_shift(img[None], self.shift(np.asarray(u)[None], img.shape[-1]))[0]

    def batch(self, images, u):
        return add_shift(images, self.shift(u, images.shape[-1]))

    def decided(self, u, hw, side):
        return {self.name: [round(float(v), 3) for v in self.shift(np.asarray(u)[None], 3)[0]]}


@register
@dataclasses.dataclass(frozen=True)
class ColourShift(Colour):
    """A random offset in [-magnitude, magnitude] per channel of each image (the
    lecture's "R+20, G-20")."""
    magnitude: float = 20.0
    name = "colour_shift"
    stream = STREAM_SHIFT
    draws = 3

    @classmethod
    def of(cls, spec):
        return cls(spec.colour_shift)

    def shift(self, u, channels: int) -> np.ndarray:
        return (2 * u[:, :channels] - 1) * self.magnitude


@dataclasses.dataclass(frozen=True)
class PCABasis:
    """Eigenvalues (descending) and eigenvectors (columns) of the RGB covariance of
    the training pixels, with values scaled to [0, 1]."""

    eigenvalues: np.ndarray   # [3]
    eigenvectors: np.ndarray  # [3, 3], column i is p_i


# fb.resnet.torch (datasets/imagenet.lua): ImageNet's RGB eigenvalues and eigenvectors
# (columns; rows R, G, B) for pixels in [0, 1], as everyone uses them
IMAGENET_PCA = PCABasis(np.array([0.2175, 0.0188, 0.0045]),
                        np.array([[-0.5675, 0.7192, 0.4009],
                                  [-0.5808, -0.0045, -0.8140],
                                  [-0.5836, -0.6948, 0.4203]]))


@register
@dataclasses.dataclass(frozen=True)
class Lighting(Colour):
    """Krizhevsky et al. 2012 Sec. 4.1 "fancy PCA": the same RGB shift
    sum_i alpha_i lambda_i p_i (alpha ~ N(0, std)) added to every pixel of an image."""
    basis: PCABasis = IMAGENET_PCA
    std: float = 0.1
    name = "lighting"
    stream = STREAM_PCA
    draws = 6   # three normals (Box-Muller on six uniforms)

    def shift(self, u, channels: int = 3) -> np.ndarray:
        u1, u2 = 1.0 - u[:, :3], u[:, 3:6]
        alphas = self.std * (np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2))
        return 255.0 * (alphas * self.basis.eigenvalues[None]) @ self.basis.eigenvectors.T


# ------------------------------------------------------------------ recipes
# The papers' training preprocessing as named op lists, in order. The data section's
# fields switch ops on or off (`recipe`): flip off removes "flip", colour_shift > 0 adds
# "colour_shift", pca_colour adds "lighting", crop_pad 0 removes "pad_crop", input_pad
# adds "pad". A new op: one registered class above, and its name in a list here.
RECIPES = {
    # He et al. 2015 Sec. 4.2: 4 pixels padded on each side, a random 32x32 crop of the
    # padded image or its horizontal flip
    "cifar": ("pad_crop", "flip"),
    # He et al. 2015 Sec. 3.4: shorter side random in [256, 480], a 224x224 crop or its
    # flip, the standard colour augmentation of Krizhevsky et al.
    "resnet": ("scale_crop", "flip", "lighting"),
    # Szegedy et al. 2015 Sec. 6, as torchvision's RandomResizedCrop: area 8-100 %,
    # aspect ratio 3/4-4/3, and the flip
    "inception": ("random_resized_crop", "flip"),
    # Krizhevsky et al. 2012 Sec. 4.1: 224x224 crops of the 256x256 image, their
    # flips, PCA lighting
    "alexnet": ("alexnet_crop", "flip", "lighting"),
    # no augmentation: the single test view at every epoch
    "center": ("center_view",),
}
AUGMENTS = tuple(RECIPES)


def recipe(spec) -> list:
    """The ops a data section (cnn_jax.data.dataset.DataSpec) trains with, in order:
    its preset's list (`spec.augment`) as its fields switch them."""
    names = list(RECIPES[spec.augment])
    if not spec.flip and "flip" in names:
        names.remove("flip")
    if not spec.crop_pad and "pad_crop" in names:
        names.remove("pad_crop")
    if spec.colour_shift:   # before the lighting, as they were always summed
        names.insert(names.index("lighting") if "lighting" in names else len(names),
                     "colour_shift")
    if spec.pca_colour and "lighting" not in names:
        names.append("lighting")
    ops = [OPS[n].of(spec) for n in names]
    if spec.input_pad:   # after a crop that resamples, else first
        at = 1 if ops and ops[0].resamples else 0
        ops.insert(at, Pad(spec.input_pad))
    return ops


def add_shift(images: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """images (float32 out, unclipped) + one offset per image and channel [B, C]."""
    return images.astype(np.float32) + shift.astype(np.float32)[:, None, None, :]


def pca_basis(images: np.ndarray, chunk: int = 4096) -> PCABasis:
    """Covariance of all pixels' RGB values (in [0, 1]) accumulated over chunks."""
    if images.shape[-1] != 3:
        raise BadInput(f"PCA colour augmentation needs RGB images; got {images.shape[-1]} "
                       f"channel(s)")
    n, s, ss = 0, np.zeros(3), np.zeros((3, 3))
    for i in range(0, len(images), chunk):
        x = np.asarray(images[i:i + chunk], np.float64).reshape(-1, 3) / 255.0
        n, s, ss = n + len(x), s + x.sum(0), ss + x.T @ x
    mean = s / n
    cov = (ss - n * np.outer(mean, mean)) / (n - 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    return PCABasis(values[order], vectors[:, order])


def cached_pca_basis(images: np.ndarray, cache_file: Optional[Path]) -> PCABasis:
    """`pca_basis`, stored beside the dataset's cache so it is computed once."""
    if cache_file is not None and cache_file.exists():
        z = np.load(cache_file)
        return PCABasis(z["eigenvalues"], z["eigenvectors"])
    basis = pca_basis(images)
    if cache_file is not None:
        tmp = cache_file.with_suffix(f".tmp{np.random.randint(1 << 30)}.npz")
        np.savez(tmp, eigenvalues=basis.eigenvalues, eigenvectors=basis.eigenvectors)
        tmp.replace(cache_file)
    return basis


# ------------------------------------------------------------------ normalisation
@dataclasses.dataclass
class Normalizer:
    """(x - mean) / std. mean per pixel [H, W, C] (He et al.: "the per-pixel mean is
    subtracted") or per channel [C]; std per channel or 1. Works on numpy and jax
    arrays alike, so it can run on the device after a uint8 transfer."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_data(cls, images: np.ndarray, per_pixel: bool = True, scale: bool = False,
                  chunk: int = 4096) -> "Normalizer":
        total = np.zeros(images.shape[1:], np.float64)
        total_sq = np.zeros(images.shape[-1], np.float64)
        for i in range(0, len(images), chunk):
            x = np.asarray(images[i:i + chunk], np.float64)
            total += x.sum(0)
            total_sq += np.square(x).sum((0, 1, 2))
        pixel_mean = total / len(images)
        channel_mean = pixel_mean.mean((0, 1))
        n_pix = len(images) * images.shape[1] * images.shape[2]
        std = np.sqrt(total_sq / n_pix - channel_mean ** 2) if scale else np.ones_like(channel_mean)
        mean = pixel_mean if per_pixel else channel_mean
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def per_channel(self) -> "Normalizer":
        """The same with the per-pixel mean's average per channel: for views of any
        size (He et al.'s fully-convolutional multi-scale test)."""
        mean = self.mean.mean((0, 1)) if self.mean.ndim == 3 else self.mean
        return Normalizer(mean.astype(np.float32), self.std)

    def __call__(self, x):
        if self.mean.ndim == 3 and tuple(x.shape[-3:-1]) != self.mean.shape[:2]:
            raise BadInput(f"a per-pixel mean of {self.mean.shape[0]}x{self.mean.shape[1]} "
                           f"cannot normalise {x.shape[-3]}x{x.shape[-2]} images; views of "
                           f"other sizes use Normalizer.per_channel()")
        return (x.astype("float32") - self.mean) / self.std


# ------------------------------------------------------------------ test views
TEN = 10
CENTRE, CENTRE_MIRRORED = 4, 9      # positions in ten_views' order


def five_corners(hw, side: int) -> list[tuple[int, int]]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops' corners."""
    h, w = hw
    return [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side), centre(hw, side)]


def view_source(data, where: str, side: int, pad_by: int, exact: bool = True) -> np.ndarray:
    """The image the single and ten views are cut from: an image of the network's side
    zero-padded by `pad_by` (CIFAR: the training crops' padding; its centre view is
    the image itself); any other with its shorter side resized to 256 / 224 * side,
    exactly as torchvision's Resize (PIL's decode and resize: `exact`; the training
    op center_view may decode faster, `cut`)."""
    if isinstance(data, np.ndarray) and data.shape[:2] == (side, side):
        return pad(data, pad_by) if pad_by else data
    hw = image_size(data, where)
    out = shorter_side(hw, round(side * EVAL_RESIZE))
    return cut(data, where, (0, 0, *hw), out, hw, fast=not exact)


def ten_views(img: np.ndarray, side: int) -> np.ndarray:
    """[10, side, side, C]: the five crops of `img` (a view_source), then the same five
    mirrored (AlexNet's and the ResNet paper's 10-crop)."""
    five = [img[t:t + side, l:l + side] for t, l in five_corners(img.shape[:2], side)]
    return np.stack(five + [v[:, ::-1] for v in five])


def ten_views_batch(images: np.ndarray, side: int) -> np.ndarray:
    """[B, 10, side, side, C] of a batch of one size: `ten_views` vectorised."""
    five = [images[:, t:t + side, l:l + side] for t, l in five_corners(images.shape[1:3], side)]
    return np.stack(five + [v[:, :, ::-1] for v in five], axis=1)


def pick(views_10: np.ndarray, views: str) -> np.ndarray:
    """The views a protocol uses of a [B, 10, ...] ten-view stack: '1' the centre,
    '2' the centre and its mirror, '10' all."""
    return {"1": views_10[:, [CENTRE]], "2": views_10[:, [CENTRE, CENTRE_MIRRORED]],
            "10": views_10}[views]


def multiscale_shape(hw, shorter: int) -> tuple[int, int]:
    """(H, W) of a multi-scale view: shorter side `shorter`, the longer one on the
    ASPECT_STEP grid nearest the image's own aspect ratio (within 1 %)."""
    h, w = hw
    aspect = max(h, w) / min(h, w)
    k = round(math.log(aspect) / math.log(ASPECT_STEP))
    longer = max(shorter, round(shorter * ASPECT_STEP ** k))
    return (shorter, longer) if h <= w else (longer, shorter)


def multiscale_views(data, where: str, side: int) -> list[np.ndarray]:
    """The whole image at the shorter sides MULTISCALE * side / 224 (He et al. 2015,
    Sec. 3.4: scores averaged over the scales)."""
    hw = image_size(data, where)
    return [cut(data, where, (0, 0, *hw), multiscale_shape(hw, round(s * side / 224)), hw,
                fast=False) for s in MULTISCALE]
