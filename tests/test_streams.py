"""Streamed full-size images: the record sources (folder, tar read in place, ArrayRecord,
TFDS), the papers' ImageNet transforms (geometry, determinism, decoding), the test
protocols, top-5 error, the bad inputs, and training and evaluating on imagenet_sample."""
import io
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax.data import ops as A
from cnn_jax.data import sources as R
from cnn_jax.data.dataset import LIGHTING, Dataset
from cnn_jax.data.keys import IMAGE, LABEL, MASK, SHIFT, SKIPPED
from cnn_jax.data.pipeline import eval_batches, train_dataset
from cnn_jax.data.sources import SHARED_DATA, DataError, MissingSplit

S = A  # the ops decode, cut and view full-size images too

SAMPLE = SHARED_DATA / "imagenet_sample.tar"
needs_sample = pytest.mark.skipif(not SAMPLE.exists(), reason=f"{SAMPLE} is absent")
ROOT = Path(__file__).resolve().parents[1]


def jpeg(h, w, seed=0, mode="RGB", fmt="JPEG") -> bytes:
    """A smooth random image (JPEG-friendly), encoded."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=95)
    return buf.getvalue()


def imagefolder(root: Path, classes=("cat", "dog", "fox"), per_class=3, split="train"):
    """<root>/<split>/<class>/<i>.JPEG of assorted sizes (upper-case suffix, as ImageNet)."""
    files = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            files[f"{split}/{name}/{i}.JPEG"] = jpeg(40 + 13 * i, 60 + 7 * c, seed=10 * c + i)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def tar_of(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:  # uncompressed: read in place
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("CNN_JAX_CACHE_DIR", str(d))
    return d


# ------------------------------------------------------------------ sources
def test_folder_and_tar_give_the_same_records_and_the_index_is_cached(tmp_path, cache,
                                                                       monkeypatch):
    folder = tmp_path / "pets"
    files = imagefolder(folder)
    (folder / "train" / "cat" / "notes.txt").write_text("not an image")
    archive = tar_of(folder, tmp_path / "pets.tar")
    as_dir = R.open_stored(f"imagefolder:{folder}", "train")
    as_tar = R.open_stored(f"imagefolder:{archive}", "train")
    assert len(as_dir) == len(as_tar) == 9 and as_dir.classes == ["cat", "dog", "fox"]
    assert as_dir.labels.tolist() == as_tar.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(9):
        assert as_dir.read(i) == as_tar.read(i)
        assert as_dir.read(i)[0] == files[as_dir.names[i]]   # sorted path order
    assert as_tar.where(4).endswith("pets.tar:pets/train/dog/1.JPEG")
    # built once: a second opening reads the cached index, scanning nothing
    from cnn_jax.data import imagefolder as scanner
    monkeypatch.setattr(scanner, "scan", lambda root: pytest.fail("rescanned"))
    again = R.open_stored(f"imagefolder:{archive}", "train")
    assert again.read(8) == as_tar.read(8)
    with pytest.raises(MissingSplit, match="no 'test' split"):
        R.open_stored(f"imagefolder:{archive}", "test")


def test_a_changed_archive_gets_a_new_index(tmp_path, cache):
    folder = tmp_path / "pets"
    imagefolder(folder)
    archive = tar_of(folder, tmp_path / "pets.tar")
    first = R.open_stored(f"imagefolder:{archive}", "train")
    (folder / "train" / "dog" / "9.JPEG").write_bytes(jpeg(50, 50, seed=99))
    tar_of(folder, archive)
    second = R.open_stored(f"imagefolder:{archive}", "train")
    assert len(first) == 9 and len(second) == 10


def test_records_pickle_without_their_open_files(tmp_path, cache):
    import pickle
    folder = tmp_path / "pets"
    imagefolder(folder)
    records = R.open_stored(f"imagefolder:{tar_of(folder, tmp_path / 'p.tar')}", "train")
    records.read(0)  # opens the archive
    copy = pickle.loads(pickle.dumps(records))
    assert copy.read(5) == records.read(5)


def test_arrayrecord_shards_hold_the_same_records(tmp_path, cache):
    folder = tmp_path / "pets"
    imagefolder(folder)
    imagefolder(folder, per_class=1, split="val")
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "scripts/prepare_arrayrecord.py", "--data", str(folder),
                        "--out", str(out), "--shards", "2"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json", "train-00000-of-00002.array_record", "train-00001-of-00002.array_record",
        "train_labels.npy", "val-00000-of-00002.array_record", "val-00001-of-00002.array_record",
        "val_labels.npy"]
    for split in ("train", "val"):
        shards = R.open_stored(f"arrayrecord:{out}", split)
        folder_records = R.open_stored(f"imagefolder:{folder}", split)
        assert shards.classes == folder_records.classes
        assert [shards.read(i) for i in range(len(shards))] == \
            [folder_records.read(i) for i in range(len(folder_records))]
    # bad input: a non-empty --out, a missing folder, a missing shard
    r = subprocess.run([sys.executable, "scripts/prepare_arrayrecord.py", "--data", str(folder),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not empty" in r.stderr
    with pytest.raises(DataError, match="no dataset.json"):
        R.open_stored(f"arrayrecord:{tmp_path / 'nowhere'}", "train")
    (out / "val-00001-of-00002.array_record").unlink()
    with pytest.raises(DataError, match="shard\\(s\\) missing"):
        R.open_stored(f"arrayrecord:{out}", "val")


def test_unprepared_tfds_imagenet_says_what_to_download(tmp_path):
    with pytest.raises(DataError) as e:
        R.open_stored("imagenet2012", "train", data_dir=str(tmp_path))
    assert "ILSVRC2012_img_train.tar" in str(e.value) and "ILSVRC2012_img_val.tar" in str(e.value)
    assert "tfds build imagenet2012" in str(e.value)


def test_bad_folders_are_refused(tmp_path, cache):
    folder = tmp_path / "pets"
    imagefolder(folder)
    (folder / "train" / "owl").mkdir()
    with pytest.raises(DataError, match="class folder\\(s\\) with no images: .*owl"):
        R.open_stored(f"imagefolder:{folder}", "train")
    with pytest.raises(DataError, match="class folder\\(s\\) with no images: .*owl"):
        R.open_stored(f"imagefolder:{tar_of(folder, tmp_path / 'p.tar')}", "train")
    (folder / "train" / "owl").rmdir()
    with tarfile.open(tmp_path / "p.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="pets")
    with pytest.raises(DataError, match="uncompressed .tar"):
        R.open_stored(f"imagefolder:{tmp_path / 'p.tar.gz'}", "train")
    with pytest.raises(DataError, match="no such file"):
        R.open_stored(f"imagefolder:{tmp_path / 'absent'}", "train")


# ------------------------------------------------------------------ decoding
def test_grayscale_cmyk_and_png_named_jpeg_become_rgb():
    rgb = S.decode(jpeg(30, 40), "rgb")
    for data in (jpeg(30, 40, mode="L"), jpeg(30, 40, mode="CMYK"), jpeg(30, 40, fmt="PNG")):
        img = S.decode(data, "x")
        assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    gray = S.decode(jpeg(30, 40, mode="L"), "gray")
    assert np.array_equal(gray[..., 0], gray[..., 2])
    assert S.image_size(jpeg(30, 40, fmt="PNG"), "x") == (30, 40)
    assert rgb.shape == (30, 40, 3)


def test_decoding_scales_in_the_dct_only_as_far_as_the_crop_allows():
    data = jpeg(800, 1200)
    assert S._scale(data, (190, 190)) == {"min_height": 200, "min_width": 300}  # 1/4
    assert S._scale(data, (224, 224)) == {"min_height": 400, "min_width": 600}  # 1/2
    assert S._scale(data, (500, 300)) == S._scale(data, (0, 0)) == {}
    assert S.decode(data, "x", (190, 190)).shape == (200, 300, 3)
    # the box cut from the reduced decode matches the box of the full decode, resized
    box = (100, 300, 600, 600)
    ours = S.cut(data, "x", box, (100, 100)).astype(np.float32)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (100, 100), Image.BILINEAR, box=(300, 100, 900, 700)), np.float32)
    assert np.abs(ours - full).mean() < 2.0


def test_corrupt_files_are_refused_or_skipped_and_counted(tmp_path, cache, caplog):
    folder = tmp_path / "pets"
    imagefolder(folder)
    bad = folder / "train" / "dog" / "1.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    records = R.open_stored(f"imagefolder:{folder}", "train")
    stream = Dataset(records, 32, (A.InceptionCrop(), A.Flip()))
    with pytest.raises(DataError, match=r"record 4: .*dog/1.JPEG.*--bad-images skip"):
        stream.train_batch(np.arange(9), np.zeros(9, int), 0)
    skipping = Dataset(records, 32, (A.InceptionCrop(), A.Flip()), bad_images="skip")
    with caplog.at_level(logging.WARNING):
        batch = skipping.train_batch(np.arange(9), np.zeros(9, int), 0)
    assert batch[SKIPPED].tolist() == [4] and "dog/1.JPEG" in caplog.text
    assert batch[MASK].tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 1]   # left out, not replaced
    assert not batch[IMAGE][4].any() and batch[IMAGE][5].any()
    (folder / "train" / "fox" / "0.JPEG").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="record 6: .*fox/0.JPEG: not an image"):
        Dataset(records, 32).eval_batch(np.array([0, 6]))


# ------------------------------------------------------------------ training geometry
def boxes(fn, hw, side, n, k):
    u = A.uniforms(0, 0, np.arange(n), A.STREAM_CROP, k)
    return [fn(hw, side, row) for row in u]


def test_inception_boxes_are_torchvisions_distribution():
    T = pytest.importorskip("torchvision.transforms")
    import torch
    hw = (375, 500)
    got = boxes(A.InceptionCrop().box, hw, 224, 8000, 40)
    area = np.array([h * w for _, _, h, w in got]) / (hw[0] * hw[1])
    aspect = np.array([w / h for _, _, h, w in got])
    assert all(0 <= t and 0 <= l and t + h <= hw[0] and l + w <= hw[1] for t, l, h, w in got)
    assert area.min() >= 0.075 and area.max() <= 1.0
    assert aspect.min() >= 0.74 and aspect.max() <= 1.34
    torch.manual_seed(0)  # the same distribution as torchvision's (tries rejected alike)
    theirs = [T.RandomResizedCrop.get_params(torch.zeros(3, *hw), (0.08, 1.0), (3 / 4, 4 / 3))
              for _ in range(8000)]
    their_area = np.array([h * w for _, _, h, w in theirs]) / (hw[0] * hw[1])
    assert abs(area.mean() - their_area.mean()) < 0.01
    assert abs(np.median(area) - np.median(their_area)) < 0.02
    assert abs(np.mean(aspect > 1) - np.mean([w > h for _, _, h, w in theirs])) < 0.025
    # no attempt fits a 10:1 strip: the centre crop at the largest allowed aspect
    assert A.InceptionCrop().box((50, 500), 224, np.ones(40) * 0.999) == (0, 216, 50, 67)


def test_resnet_boxes_are_scale_augmentation():
    hw = (375, 500)
    got = boxes(A.ScaleCrop().box, hw, 224, 2000, 3)
    shorter = np.array([224 * min(hw) / h for _, _, h, _ in got])   # the resized shorter side
    assert shorter.min() >= 256 - 1e-6 and shorter.max() <= 480 + 1e-6
    assert abs(shorter.mean() - 368) < 5                             # uniform on [256, 480]
    assert all(h == w and t + h <= hw[0] + 1e-9 and l + w <= hw[1] + 1e-9 for t, l, h, w in got)
    small = boxes(A.ScaleCrop().box, hw, 64, 200, 3)                      # the side scales it
    assert np.allclose(sorted(b[2] for b in small), sorted(b[2] for b in got[:200]))


def test_alexnet_boxes_are_224_of_the_central_256():
    hw = (375, 500)
    got = boxes(A.AlexNetCrop().box, hw, 224, 500, 2)
    for t, l, h, w in got:
        assert math.isclose(h, 375 * 224 / 256) and h == w
        assert 0 <= t <= 375 - h + 1e-9 and 62.5 <= l <= 62.5 + 375 - h + 1e-9


def stream_of(tmp_path, side=32, augment="inception", lighting=False, **kw):
    folder = tmp_path / "pets"
    imagefolder(folder)
    names = [n for n in A.RECIPES[augment] if n != "lighting"] + (["lighting"] if lighting else [])
    return Dataset(R.open_stored(f"imagefolder:{folder}", "train"), side,
                   tuple(A.OPS[n]() for n in names), **kw)


def test_views_depend_only_on_seed_epoch_and_index(tmp_path, cache):
    for augment in set(A.RECIPES) - {"center", "cifar"}:
        stream = stream_of(tmp_path, augment=augment, lighting=augment in LIGHTING)
        whole = stream.train_batch(np.arange(9), np.zeros(9, int), 7)
        part = stream.train_batch(np.array([5, 2]), np.zeros(2, int), 7)
        assert whole[IMAGE].shape == (9, 32, 32, 3) and whole[IMAGE].dtype == np.uint8
        assert np.array_equal(part[IMAGE], whole[IMAGE][[5, 2]])
        later = stream.train_batch(np.arange(9), np.ones(9, int), 7)
        assert not np.array_equal(later[IMAGE], whole[IMAGE])
        assert (SHIFT in whole) == (augment in LIGHTING)
    shift = stream_of(tmp_path, lighting=True).train_batch(np.arange(9), np.zeros(9, int), 7)[SHIFT]
    u = A.uniforms(7, 0, np.arange(9), A.STREAM_PCA, 6)   # three normals, Box-Muller
    alphas = 0.1 * np.sqrt(-2 * np.log(1 - u[:, :3])) * np.cos(2 * np.pi * u[:, 3:])
    np.testing.assert_allclose(shift, 255 * (alphas * [0.2175, 0.0188, 0.0045]) @
                               A.IMAGENET_PCA.eigenvectors.T, rtol=1e-5)


def test_center_is_the_single_test_view_at_every_epoch(tmp_path, cache):
    stream = stream_of(tmp_path, augment="center")
    first = stream.train_batch(np.arange(9), np.zeros(9, int), 7)
    later = stream.train_batch(np.arange(9), np.full(9, 5), 8)
    assert np.array_equal(first[IMAGE], later[IMAGE])
    assert np.array_equal(first[IMAGE], stream.eval_batch(np.arange(9))[IMAGE])
    assert SHIFT not in first


def test_grain_batches_are_the_same_with_workers_and_resume(tmp_path, cache):
    stream = stream_of(tmp_path)
    def draws(workers, n=5, state=None):
        it = iter(train_dataset(stream, 4, seed=1, workers=workers))
        if state is not None:
            it.set_state(state)
        return [next(it)[IMAGE] for _ in range(n)], it.get_state()
    alone, _ = draws(0)
    assert all(np.array_equal(a, b) for a, b in zip(alone, draws(2)[0]))
    _, state = draws(0, n=2)
    resumed, _ = draws(0, n=3, state=state)
    assert all(np.array_equal(a, b) for a, b in zip(alone[2:], resumed))


# ------------------------------------------------------------------ test protocols
def test_single_ten_and_multiscale_views(tmp_path, cache):
    stream = stream_of(tmp_path, side=32)
    data, _ = stream.source.read(4)
    hw = A.image_size(data, "x")
    assert hw == (53, 67)
    shorter = A.shorter_side(hw, round(32 * 256 / 224))
    assert shorter == (37, 46)                         # 37 * 67 / 53 = 46.8, truncated
    resized = A.cut(data, "x", (0, 0, *hw), shorter, hw)
    ten = A.ten_views(resized, 32)
    np.testing.assert_array_equal(ten, A.ten_views_batch(resized[None], 32)[0])
    single = stream.eval_batch(np.array([4]))[IMAGE][0]
    np.testing.assert_array_equal(single, ten[4])   # the centre crop
    assert A.centre((37, 46), 32) == (2, 7)        # torchvision: round(2.5) = 2, round(7.0)
    scales = A.multiscale_views(data, "x", 32)
    assert [min(v.shape[:2]) for v in scales] == [round(s * 32 / 224) for s in A.MULTISCALE]
    batches = list(eval_batches(stream, 4, views="10", workers=0))
    assert [b[IMAGE].shape for b in batches] == [(4, 10, 32, 32, 3)] * 3
    assert batches[-1][MASK].tolist() == [1, 0, 0, 0]
    two = stream.eval_batch(np.arange(3), "2")[IMAGE]
    np.testing.assert_array_equal(two[:, 1], two[:, 0, :, ::-1])   # the centre mirrored


def test_multiscale_views_keep_every_aspect_ratio_within_one_percent():
    for h, w in [(375, 500), (500, 333), (56, 2400), (480, 481), (300, 300), (200, 271),
                 (1000, 1417)]:
        for s in A.MULTISCALE:
            vh, vw = A.multiscale_shape((h, w), s)
            assert min(vh, vw) == s and (vh <= vw) == (h <= w)
            assert abs((max(vh, vw) / min(vh, vw)) / (max(h, w) / min(h, w)) - 1) < 0.011


@needs_sample
def test_multiscale_on_imagenet_sample_stretches_no_image_by_2_percent(cache):
    records = R.open_stored("imagenet_sample", "train")
    worst = 0.0
    for i in range(0, len(records), 7):
        hw = A.image_size(records.read(i)[0], records.where(i))
        for s in (224, 640):
            vh, vw = A.multiscale_shape(hw, s)
            worst = max(worst, abs((vw / vh) / (hw[1] / hw[0]) - 1))
    assert worst < 0.02


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


@needs_sample
def test_shrinking_is_antialiased_as_pil_and_torchvision(cache):
    """Our resize against PIL's antialiased bilinear (= torchvision antialias=True) on
    real photographs shrunk 1.3-2x, whole or cut (strided views): Pillow's resample,
    off by at most 1 where Pillow takes its two passes in the other order (plain
    bilinear is ~35 dB away, the issue's bound 40 dB)."""
    records = R.open_stored("imagenet_sample", "train")
    worst, exact, scores = 0, 0, []
    for i in range(0, 1000, 50):
        img = A.decode(records.read(i)[0], "x")
        for factor in (1.3, 1.6, 2.0):
            out = (round(img.shape[0] / factor), round(img.shape[1] / factor))
            for src in (img, img[5:, 7:-3]):
                pil = np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize(
                    out[::-1], Image.BILINEAR))
                ours = A.resize(src, out)
                worst = max(worst, int(np.abs(ours.astype(int) - pil).max()))
                exact += np.array_equal(ours, pil)
                scores.append(psnr(ours, pil))
    assert worst <= 1 and min(scores) >= 50, (worst, sorted(scores)[:3])
    assert exact >= len(scores) // 2   # same-factor shrinks: Pillow's order, bit-exact
    gray = img[..., :1]                # one channel, and a shrink along one axis only
    np.testing.assert_array_equal(A.resize(gray, (gray.shape[0] // 3, gray.shape[1]))[..., 0],
                                  np.asarray(Image.fromarray(np.ascontiguousarray(
                                      gray[..., 0])).resize((gray.shape[1], gray.shape[0] // 3),
                                                            Image.BILINEAR)))


def test_test_views_round_crop_boxes_as_torchvision():
    T = pytest.importorskip("torchvision.transforms.v2.functional")
    import torch
    rng = np.random.default_rng(0)
    for h, w in [(37, 46), (38, 47), (45, 45), (33, 60), (60, 33)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        theirs = T.center_crop(torch.from_numpy(img).permute(2, 0, 1), [32, 32])
        top, left = A.centre((h, w), 32)
        np.testing.assert_array_equal(img[top:top + 32, left:left + 32],
                                      theirs.permute(1, 2, 0).numpy())
    for hw in [(375, 500), (500, 333), (333, 500), (480, 481)]:
        resized = T.resize(torch.zeros(3, *hw), [256])
        assert A.shorter_side(hw, 256) == tuple(resized.shape[1:])


def test_batched_ops_equal_the_per_image_ops():
    """The numpy fast path for decoded arrays of one size is the per-image ops, batched."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
    source = R.Arrays(images, rng.integers(0, 3, 24), ["a", "b", "c"])
    recipe = (A.Pad(2), A.PadCrop(4), A.Flip(), A.ColourShift(20.0),
              A.Lighting(A.pca_basis(images)))
    fast = Dataset(source, 8, recipe)
    assert fast.batched
    slow = Dataset(R.Subset(source, np.arange(24)), 8, recipe)
    assert not slow.batched
    index, epoch = np.arange(3, 19), np.full(16, 2)
    a, b = fast.train_batch(index, epoch, 5), slow.train_batch(index, epoch, 5)
    np.testing.assert_array_equal(a[LABEL], b[LABEL])
    # per image: uint8 out and the colour as a shift, added on the device
    np.testing.assert_allclose(a[IMAGE], b[IMAGE].astype(np.float32) +
                               b[SHIFT][:, None, None, :], atol=1e-3)
    for views in ("1", "2", "10"):
        np.testing.assert_array_equal(fast.eval_batch(index, views)[IMAGE],
                                      slow.eval_batch(index, views)[IMAGE])


def test_top5_error():
    import jax.numpy as jnp
    from cnn_jax.train.metrics import top5_error
    logits = jnp.array([[0., 1, 2, 3, 4, 5, 6], [6., 5, 4, 3, 2, 1, 0]])
    assert top5_error(logits, jnp.array([2, 2])).tolist() == [0.0, 0.0]
    assert top5_error(logits, jnp.array([1, 6])).tolist() == [1.0, 1.0]
    assert top5_error(logits[:, :3], jnp.array([0, 2])).tolist() == [0.0, 0.0]  # <= 5 classes


# ------------------------------------------------------------------ end to end
def train_cli(out, *extra, cache_dir):
    args = [sys.executable, "-m", "cnn_jax.train", "--model", "resnet18", "--data",
            "imagenet_sample", "--augment", "inception", "--image-size", "32", "--steps", "3",
            "--batch", "8", "--eval-subset", "40", "--workers", "0", "--no-progress",
            "--out", str(out), *extra]
    env = dict(os.environ, CNN_JAX_CACHE_DIR=str(cache_dir))
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def streamed_run(tmp_path) -> dict:
    r = train_cli(tmp_path / "run", cache_dir=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "no test/ or val/ split: evaluating on the training images" in r.stderr
    return json.loads((tmp_path / "run" / "results.json").read_text())


@needs_sample
@pytest.mark.xdist_group("imagenet_sample")
def test_train_on_imagenet_sample_streamed(tmp_path):
    res = streamed_run(tmp_path)
    for key in ("final_train_set_error", "final_train_set_top1_error",
                "final_train_set_top5_error"):
        assert 0 <= res[key] <= 1
    assert res["config"]["data"]["augment"] == "inception"
    cached = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file())
    assert cached < 20e6   # streamed: an index, no decoded images


# 30 s more: kept out of the 15-minute CI (the 10-crop test of a many-host run is there)
@pytest.mark.slow
@needs_sample
def test_imagenet_sample_from_arrayrecord_shards_and_ten_crop(tmp_path):
    res = streamed_run(tmp_path)
    # the same run from ArrayRecord shards of the same archive: the same parameters
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "scripts/prepare_arrayrecord.py", "--data",
                    "imagenet_sample", "--out", str(shards), "--shards", "3"], cwd=ROOT,
                   check=True, capture_output=True)
    r2 = train_cli(tmp_path / "ar", "--data", f"arrayrecord:{shards}",
                   cache_dir=tmp_path / "cache")
    assert r2.returncode == 0, r2.stderr
    res2 = json.loads((tmp_path / "ar" / "results.json").read_text())
    assert res2["final_params_digest"] == res["final_params_digest"]
    # 10-crop on the training images
    ev = subprocess.run([sys.executable, "-m", "cnn_jax.evaluate", "--checkpoint",
                         str(tmp_path / "run"), "--split", "train", "--views", "10", "--json",
                         "--workers", "0"], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, CNN_JAX_CACHE_DIR=str(tmp_path / "cache")))
    assert ev.returncode == 0, ev.stderr
    last = json.loads(ev.stdout.strip().splitlines()[-1])
    assert last["n_examples"] == 1000 and last["views"] == "10"
    assert last["top1_error"] == last["error"] and 0 <= last["top5_error"] <= last["error"]
    assert "training images" in ev.stderr


@needs_sample
def test_streaming_bad_input_exits_2(tmp_path):
    r = train_cli(tmp_path / "x", "--augment", "cifar", cache_dir=tmp_path / "cache")
    assert r.returncode == 2 and "--augment cifar" in r.stderr and "inception" in r.stderr
    r = train_cli(tmp_path / "z", "--data", f"arrayrecord:{tmp_path}/none",
                  cache_dir=tmp_path / "cache")
    assert r.returncode == 2 and "dataset.json" in r.stderr
    r = train_cli(tmp_path / "w", "--augment", "fancy", cache_dir=tmp_path / "cache")
    assert r.returncode == 2 and "--augment: must be one of cifar, resnet" in r.stderr
    assert not any((tmp_path / d).exists() for d in "xzw")


def test_an_imagenet_preset_runs_on_decoded_arrays_too():
    """One kind of dataset: the inception crop of decoded CIFAR-size arrays is the same
    op as on a JPEG, cut from the pixels instead of the file."""
    from cnn_jax.data.dataset import DataSpec, open_split
    d = open_split(DataSpec("synthetic:16x16x3:4:32:8", augment="inception", image_size=12),
                   "train", training=True)
    assert not d.batched and d.image_shape == (12, 12, 3)
    b = d.train_batch(np.arange(8), np.zeros(8, int), 0)
    assert b[IMAGE].shape == (8, 12, 12, 3) and b[IMAGE].dtype == np.uint8
    assert d.source.images.shape[1:3] == (12, 12)   # stored at the side S, as every folder
    box = A.InceptionCrop().box((12, 12), 12, A.uniforms(0, 0, [3], A.STREAM_CROP, 40)[0])
    t, l, h, w = box
    img = d.source.images[3][t:t + h, l:l + w]
    flip = A.uniforms(0, 0, [3], A.STREAM_FLIP, 1)[0, 0] < 0.5
    expect = A.resize(img, (12, 12))
    np.testing.assert_array_equal(b[IMAGE][3], expect[:, ::-1] if flip else expect)


def test_multiscale_scores_are_gathered_per_image_and_scale():
    """Views of one shape run together (padded to a power of two); every image's score
    on every scale lands in its own place."""
    from cnn_jax.train.evaluator import _multiscale_scores
    calls = []
    def scores(x):  # a "network" whose scores are the view's mean and size
        calls.append(x.shape)
        return np.stack([x.mean((1, 2, 3)), x.shape[1] + 0 * x.mean((1, 2, 3))], -1)[None]
    rng = np.random.default_rng(0)
    shapes = [[(8, 10), (12, 15)], [(10, 8), (15, 12)], [(8, 10), (12, 15)]]
    per_image = [[rng.integers(0, 255, (*s, 3)).astype(np.uint8) for s in image]
                 for image in shapes]
    out = _multiscale_scores(scores, per_image)
    assert out.shape == (1, 6, 2)
    for i, image in enumerate(per_image):
        for j, view in enumerate(image):
            assert out[0, 2 * i + j, 0] == pytest.approx(view.mean())
            assert out[0, 2 * i + j, 1] == view.shape[0]
    assert sorted(calls) == sorted([(2, 8, 10, 3), (2, 12, 15, 3), (1, 10, 8, 3),
                                    (1, 15, 12, 3)])


def test_unreadable_files_are_left_out_and_counted_once_in_training_and_evaluation(tmp_path):
    """--bad-images skip: random bytes, an empty file and a truncated JPEG are left out
    (never replaced by another image), each counted once however many epochs meet it,
    in results.json, the final line and cnn_jax.evaluate's JSON."""
    folder = tmp_path / "pets"
    imagefolder(folder, per_class=4)
    (folder / "train" / "cat" / "1.JPEG").write_bytes(os.urandom(3000))
    (folder / "train" / "dog" / "2.JPEG").write_bytes(b"")
    truncated = folder / "train" / "fox" / "3.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:300])
    env = dict(os.environ, CNN_JAX_CACHE_DIR=str(tmp_path / "cache"))
    common = [sys.executable, "-m", "cnn_jax.train", "--model", "resnet8", "--data",
              f"imagefolder:{folder}", "--augment", "center", "--image-size", "16",
              "--batch", "4", "--workers", "0", "--no-progress"]
    refused = subprocess.run(common + ["--steps", "3", "--out", str(tmp_path / "r")], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--bad-images skip" in refused.stderr
    r = subprocess.run(common + ["--steps", "9", "--bad-images", "skip", "--out",
                                 str(tmp_path / "run")],       # 3 epochs of 12 images
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["skipped_images"] == 3
    assert "3 unreadable file(s) left out" in r.stdout.strip().splitlines()[-1]
    assert res["final_train_set_error"] is not None
    ev = subprocess.run([sys.executable, "-m", "cnn_jax.evaluate", "--checkpoint",
                         str(tmp_path / "run"), "--split", "train", "--views", "10",
                         "--bad-images", "skip", "--json"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    last = json.loads(ev.stdout.strip().splitlines()[-1])
    assert last["skipped_images"] == 3 and last["n_examples"] == 9   # left out, not replaced
    assert "3 unreadable left out" in ev.stderr


def sample_photos(n: int) -> list:
    """(bytes, where) of n real photos: imagenet_sample's first where it is here, else
    JPEGs of every shape made here (colour, grayscale, odd sizes)."""
    if SAMPLE.exists():
        records = R.open_stored("imagenet_sample", "train")
        return [(records.read(i)[0], records.where(i)) for i in range(n)]
    sizes = [(375, 500), (500, 333), (281, 500), (480, 640), (97, 129), (640, 427)]
    return [(jpeg(*sizes[i % len(sizes)], seed=i, mode="L" if i % 7 == 0 else "RGB"), f"#{i}")
            for i in range(n)]


def test_test_views_are_torchvisions_pixel_for_pixel():
    """The single view of a photo is torchvision's Resize(256) + CenterCrop(224) of PIL's
    decode, every pixel; so are the ten views' centre and the multiscale views' sizes."""
    T = pytest.importorskip("torchvision.transforms")
    reference = T.Compose([T.Resize(256), T.CenterCrop(224)])
    differ = []
    for data, where in sample_photos(300):
        ours = A.ten_views(A.view_source(data, where, 224, 0), 224)[A.CENTRE]
        theirs = np.asarray(reference(Image.open(io.BytesIO(data)).convert("RGB")))
        if not np.array_equal(ours, theirs):
            differ.append((where, psnr(ours, theirs)))
    assert not differ, differ[:5]


def test_training_crops_decode_fast_only_where_asked():
    """A training crop's `fast_decode` (the DCT-scaled decoding, on by default) is its
    one shortcut from PIL's decode, crop and resize; without it every crop is PIL's,
    pixel for pixel (docs/deviations.md)."""
    fast, exact = A.ScaleCrop(), A.ScaleCrop(fast_decode=False)
    scores, differ = [], 0
    for k, (data, where) in enumerate(sample_photos(300)):
        hw = A.image_size(data, where)
        u = A.uniforms(0, 0, [k], A.STREAM_CROP, fast.draws)[0]
        top, left, h, w = fast.box(hw, 224, u)
        pixels = (int(left), int(top), round(left + w), round(top + h))  # PIL crops whole ones
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop(pixels).resize(
            (224, 224), Image.BILINEAR))
        differ += not np.array_equal(exact.one(A.Picture.of(data, where), u, 224), pil)
        scores.append(psnr(fast.one(A.Picture.of(data, where), u, 224), pil))
    assert differ == 0
    assert np.median(scores) > 45       # the shortcut: small on most crops ...
    if SAMPLE.exists():                 # ... but real on ImageNet's photos (5 of 300 < 40 dB)
        assert min(scores) < 40, sorted(scores)[:5]
