"""Data: the real archives, the cache, augmentation geometry and statistics,
determinism, resume, evaluation coverage, TFDS, and every bad input."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax.errors import BadInput
from cnn_jax.data import DataError, load, stratified_holdout
from cnn_jax.data import ops as A
from cnn_jax.data import sources
from cnn_jax.data.sources import MissingSplit
from cnn_jax.data.dataset import Dataset
from cnn_jax.data.pipeline import ChunkPrefetcher, eval_batches, train_dataset

SHARED = sources.SHARED_DATA


def needs(archive: str):
    """Skipped where the archive is absent; the tests of one dataset share a worker, so
    a cold cache decodes it once (not once per worker at the same time)."""
    def mark(test):
        test = pytest.mark.xdist_group(archive)(test)
        return pytest.mark.skipif(not (SHARED / archive).exists(),
                                  reason=f"{SHARED}/{archive} is absent on this machine")(test)
    return mark


needs_cifar = needs("cifar10.tar.xz")
needs_mnist = needs("mnist.tar.xz")


# ------------------------------------------------------------------ real datasets
@needs_cifar
def test_cifar10_counts_and_balance():
    train = load("cifar10", "train")
    images, labels = train.images, train.labels
    assert images.shape == (50_000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [5_000] * 10
    test = load("cifar10", "test")
    assert test.images.shape == (10_000, 32, 32, 3)
    assert np.bincount(test.labels).tolist() == [1_000] * 10
    assert test.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]
    assert 100 < images[:100].mean() < 150  # real pixels, not a placeholder


@needs_cifar
def test_cifar10_validation_holdout_is_stratified_and_disjoint():
    train = load("cifar10", "train", holdout=5_000)
    val = load("cifar10", "val", holdout=5_000)
    assert len(train) == 45_000 and len(val) == 5_000
    assert np.bincount(val.labels).tolist() == [500] * 10
    assert not set(train.indices) & set(val.indices)
    with pytest.raises(MissingSplit, match="no val/ split"):  # never training images unasked
        load("cifar10", "val")
    np.testing.assert_array_equal(val.images[3], load("cifar10", "train").images[val.indices[3]])


@needs_mnist
def test_mnist_counts():
    m = load("mnist", "train")
    assert m.images.shape == (60_000, 28, 28, 1)
    assert np.bincount(m.labels)[0] == 5_923  # the official count of zeros
    t = load("mnist", "test")
    assert len(t) == 10_000 and np.bincount(t.labels)[0] == 980


def test_data_dir_flag_then_environment_then_shared(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("CNN_JAX_DATA_DIR", str(tmp_path / "b"))
    dirs = sources.search_dirs(str(tmp_path / "a"))
    assert dirs == [tmp_path / "a", tmp_path / "b", sources.SHARED_DATA]


def test_missing_dataset_lists_every_place_and_the_tfds_failure(tmp_path, monkeypatch):
    """A TFDS-only dataset (imagenet2012) neither here nor prepared: every place looked,
    TFDS's own failure, and (TensorFlow absent) the extra that prepares it."""
    monkeypatch.setattr(sources, "SHARED_DATA", tmp_path / "nowhere")
    monkeypatch.delenv("CNN_JAX_DATA_DIR", raising=False)

    class Unprepared:  # TFDS with nothing built in its data folder
        @staticmethod
        def builder(*a, **k):
            raise FileNotFoundError("no prepared imagenet2012 in ~/tensorflow_datasets")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", Unprepared)
    monkeypatch.setitem(sys.modules, "tensorflow", None)   # not installed
    with pytest.raises(DataError) as e:
        load("imagenet2012", "train", data_dir=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "imagenet2012.tar.xz") in msg and str(tmp_path / "nowhere") in msg
    assert "FileNotFoundError: no prepared imagenet2012" in msg
    assert "tfds build imagenet2012" in msg and 'pip install -e ".[tensorflow]"' in msg


# ------------------------------------------------------------------ ImageFolder + cache
def make_folder(root: Path, spec: dict, size=(8, 8), mode="RGB"):
    """spec: {split: {class: n_images}}; pixel values encode (split, class, i)."""
    for split, classes in spec.items():
        for ci, (cls, n) in enumerate(sorted(classes.items())):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.full((*size, 3), 10 * ci + i, np.uint8)
                Image.fromarray(arr).convert(mode).save(d / f"{i:03d}.png")
    return root


def make_tar(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_imagefolder_directory_and_archive_agree(tmp_path, cache):
    folder = make_folder(tmp_path / "toy", {"train": {"b": 3, "a": 2}, "test": {"a": 1, "b": 1}})
    archive = make_tar(folder, tmp_path / "toy.tar.gz")
    for source in (folder, archive):
        tr = load(f"imagefolder:{source}", "train")
        assert tr.classes == ["a", "b"] and tr.labels.tolist() == [0, 0, 1, 1, 1]
        assert tr.images.shape == (5, 8, 8, 3)
        assert tr.images[2, 0, 0, 0] == 10  # class b, image 0
    gray = load(f"imagefolder:{archive}", "train", channels=1)
    assert gray.images.shape == (5, 8, 8, 1)


def test_cache_is_reused_and_never_stale(tmp_path, cache):
    folder = make_folder(tmp_path / "toy", {"train": {"a": 2, "b": 2}})
    archive = make_tar(folder, tmp_path / "toy.tar.gz")
    first = load(f"imagefolder:{archive}", "train")
    assert isinstance(first.images, np.memmap)
    assert len(list(cache.glob("toy-*"))) == 1
    load(f"imagefolder:{archive}", "train")
    assert len(list(cache.glob("toy-*"))) == 1  # reused
    make_folder(folder, {"train": {"c": 1}})
    make_tar(folder, archive)  # the archive changes under the same name
    again = load(f"imagefolder:{archive}", "train")
    assert again.classes == ["a", "b", "c"] and len(again) == 5
    assert len(list(cache.glob("toy-*"))) == 2


def test_two_processes_decoding_together_agree(tmp_path, cache):
    folder = make_folder(tmp_path / "toy", {"train": {"a": 20, "b": 20}}, size=(16, 16))
    code = ("import sys, numpy as np; from cnn_jax.data import load; "
            "a = load('imagefolder:' + sys.argv[1], 'train'); print(int(a.images.sum()))")
    env = dict(os.environ, CNN_JAX_CACHE_DIR=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1] != ""
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    assert not list(cache.glob(".*tmp*"))


def test_corrupt_image_names_the_file_and_leaves_no_cache(tmp_path, cache):
    folder = make_folder(tmp_path / "toy", {"train": {"a": 2, "b": 2}})
    (folder / "train" / "b" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="train/b/001.png: cannot decode"):
        load(f"imagefolder:{folder}", "train")
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]
    skipped = load(f"imagefolder:{folder}", "train", skip_bad=True)
    assert len(skipped) == 3
    assert skipped.skipped[0][0] == "train/b/001.png" and "cannot decode" in skipped.skipped[0][1]


def test_every_image_format_pil_reads_and_the_skipped_files_are_named(tmp_path, cache, caplog):
    folder = make_folder(tmp_path / "toy", {"train": {"a": 1, "b": 1}})
    for i, suffix in enumerate((".gif", ".bmp", ".webp", ".tiff", ".JPG")):
        Image.fromarray(np.full((8, 8, 3), 100 + i, np.uint8)).save(folder / "train" / "a" / f"x{suffix}")
    (folder / "train" / "b" / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING"):
        arrays = load(f"imagefolder:{folder}", "train")
    assert len(arrays) == 7 and np.bincount(arrays.labels).tolist() == [6, 1]
    assert arrays.skipped == (("train/b/notes.txt", arrays.skipped[0][1]),)
    assert "not an image file" in arrays.skipped[0][1]
    assert "skipped 1 file(s) of 'train'" in caplog.text and "notes.txt" in caplog.text
    again = load(f"imagefolder:{folder}", "train")   # from the cache: the same report
    assert again.skipped == arrays.skipped


def test_a_named_data_directory_that_does_not_exist_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=f"--data-dir {tmp_path / 'nope'}: no such directory"):
        load("cifar10", "train", data_dir=str(tmp_path / "nope"))
    monkeypatch.setenv("CNN_JAX_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(DataError, match="CNN_JAX_DATA_DIR .*typo: no such directory"):
        load("cifar10", "train")


def test_empty_class_folder(tmp_path, cache):
    folder = make_folder(tmp_path / "toy", {"train": {"a": 2, "b": 2}})
    (folder / "train" / "c").mkdir()
    with pytest.raises(DataError, match="class folder.*with no images.*train/c"):
        load(f"imagefolder:{folder}", "train")


def test_train_and_test_with_different_classes(tmp_path, cache):
    folder = make_folder(tmp_path / "toy", {"train": {"a": 1, "b": 1}, "test": {"a": 1, "z": 1}})
    with pytest.raises(DataError, match="split 'test' has classes \\['a', 'z'\\].*\\['a', 'b'\\]"):
        load(f"imagefolder:{folder}", "test")


def test_mixed_image_sizes(tmp_path, cache):
    folder = make_folder(tmp_path / "toy", {"train": {"a": 1}}, size=(8, 8))
    make_folder(folder, {"train": {"b": 1}}, size=(9, 8))
    with pytest.raises(DataError, match="shape \\(9, 8, 3\\).*\\(8, 8, 3\\).*one size"):
        load(f"imagefolder:{folder}", "train")
    resized = load(f"imagefolder:{folder}", "train", size=(6, 6))
    assert resized.images.shape == (2, 6, 6, 3)


def test_missing_archive_and_bad_names(tmp_path, cache):
    with pytest.raises(DataError, match="no such file"):
        load(f"imagefolder:{tmp_path / 'absent.tar.xz'}", "train")
    with pytest.raises(DataError, match="unknown dataset 'cifar11'"):
        load("cifar11", "train")
    with pytest.raises(DataError, match="split must be one of"):
        load("synthetic", "validation")
    with pytest.raises(DataError, match="bad synthetic spec"):
        load("synthetic:32x32", "train")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(DataError, match="junk.tar: cannot read the archive"):
        load(f"imagefolder:{tmp_path / 'junk.tar'}", "train")


def test_synthetic_source():
    a = load("synthetic:16x16x3:5:64:32", "train")
    images, labels = a.images, a.labels
    assert images.shape == (64, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 50
    assert labels.max() < 5
    assert load("synthetic:16x16x3:5:64:32", "test").images.shape[0] == 32


def test_stratified_holdout_rounding():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    idx = stratified_holdout(labels, 7)
    assert len(idx) == 7 and len(set(idx)) == 7
    assert np.bincount(labels[idx], minlength=3).tolist() == [1, 2, 4]
    np.testing.assert_array_equal(idx, stratified_holdout(labels, 7))


# ------------------------------------------------------------------ augmentation
def test_random_crop_stays_inside_the_padded_image():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (64, 8, 8, 3), dtype=np.uint8)
    u = A.uniforms(0, 0, np.arange(64), A.STREAM_CROP, 2)
    out = A.PadCrop(4).batch(x, u)
    padded = A.pad(x, 4)
    offsets = np.floor(u * 9).astype(int)
    assert offsets.min() == 0 and offsets.max() == 8
    for i, (t, l) in enumerate(offsets):
        np.testing.assert_array_equal(out[i], padded[i, t:t + 8, l:l + 8])


def test_flip_is_an_involution():
    x = np.random.default_rng(0).integers(0, 256, (16, 5, 7, 3), dtype=np.uint8)
    u = A.uniforms(3, 1, np.arange(16), A.STREAM_FLIP, 1)
    once = A.Flip().batch(x, u)
    np.testing.assert_array_equal(A.Flip().batch(once, u), x)
    flipped = u[:, 0] < 0.5
    assert 0 < flipped.sum() < 16
    np.testing.assert_array_equal(once[flipped], x[flipped][:, :, ::-1])


def test_pca_eigenvalues_equal_numpys_and_shifts_follow_eigenvectors():
    x = np.random.default_rng(0).integers(0, 256, (50, 6, 6, 3), dtype=np.uint8)
    x[..., 1] = x[..., 0] // 2 + 40  # correlated channels
    basis = A.pca_basis(x, chunk=7)
    pixels = x.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(basis.eigenvalues, np.linalg.eigvalsh(np.cov(pixels.T))[::-1],
                               rtol=1e-10)
    # std 0 is the identity
    u = A.uniforms(0, 0, np.arange(50), A.STREAM_PCA, A.Lighting.draws)
    zero = A.Lighting(basis, std=0.0).shift(u, 3)
    np.testing.assert_array_equal(A.add_shift(x, zero), x)
    # each image's shift is sum_i alpha_i lambda_i p_i * 255, alpha ~ N(0, 0.1): three
    # normals by Box-Muller from six uniforms
    alphas = 0.1 * np.sqrt(-2 * np.log(1 - u[:, :3])) * np.cos(2 * np.pi * u[:, 3:])
    shift = A.Lighting(basis).batch(x, u) - x.astype(np.float32)
    expected = 255 * (alphas * basis.eigenvalues) @ basis.eigenvectors.T
    np.testing.assert_allclose(shift[:, 0, 0], expected, rtol=1e-4, atol=1e-4)
    assert np.allclose(shift, shift[:, :1, :1], atol=1e-4)  # the same for every pixel


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    x = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    d = cifar_like(x, crop_pad=2, colour_shift=20)
    idx = np.arange(32)
    aug = lambda seed, epoch, index: d.train_batch(index, np.full(len(index), epoch), seed)["image"]  # noqa
    full = aug(5, 1, idx)
    # the same examples in other batch compositions give the same results
    np.testing.assert_array_equal(aug(5, 1, idx[10:20]), full[10:20])
    assert not np.array_equal(aug(5, 2, idx), full)  # another epoch
    assert not np.array_equal(aug(6, 1, idx), full)  # another seed


def test_normalizer_per_pixel_and_per_channel():
    x = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    per_pixel = A.Normalizer.from_data(x, per_pixel=True, chunk=3)
    np.testing.assert_allclose(per_pixel.mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(per_pixel(x).mean(0), 0, atol=1e-4)
    per_channel = A.Normalizer.from_data(x, per_pixel=False, scale=True)
    out = per_channel(x)
    np.testing.assert_allclose(out.mean((0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(out.std((0, 1, 2)), 1, rtol=1e-4)


def test_ten_crop_geometry():
    x = np.arange(6 * 6).reshape(1, 6, 6, 1)
    views = A.ten_views_batch(x, 4)
    assert views.shape == (1, 10, 4, 4, 1)
    corners = [views[0, i, 0, 0, 0] for i in range(5)]
    assert corners == [x[0, 0, 0, 0], x[0, 0, 2, 0], x[0, 2, 0, 0], x[0, 2, 2, 0], x[0, 1, 1, 0]]
    np.testing.assert_array_equal(views[0, 5:], views[0, :5, :, ::-1])
    np.testing.assert_array_equal(A.ten_views(x[0], 4), views[0])
    padded = A.ten_views_batch(A.pad(x, 1), 6)  # CIFAR style: views of the padded image
    assert padded[0, 0, 0, 0, 0] == 0 and padded[0, 0, 1, 1, 0] == x[0, 0, 0, 0]


# ------------------------------------------------------------------ pipeline
def cifar_like(source, crop_pad=0, flip=False, colour_shift=0.0) -> Dataset:
    """A Dataset of decoded arrays with the CIFAR preset's ops."""
    if isinstance(source, np.ndarray):
        source = sources.Arrays(source, np.zeros(len(source), np.int32), ["a", "b"])
    recipe = ((A.PadCrop(crop_pad),) if crop_pad else ()) + ((A.Flip(),) if flip else ()) + \
        ((A.ColourShift(colour_shift),) if colour_shift else ())
    return Dataset(source, source.image_shape[0], recipe)


def synthetic(n=200, **ops):
    return cifar_like(load("synthetic:8x8x3:10:%d:50" % n, "train"), **ops)


def take(it, k):
    return [next(it) for _ in range(k)]


def test_batches_are_deterministic_and_reshuffled_each_epoch():
    arrays = synthetic(64, crop_pad=2, flip=True)
    a = take(iter(train_dataset(arrays, 16, seed=3, workers=0)), 8)
    b = take(iter(train_dataset(arrays, 16, seed=3, workers=0)), 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
    epoch0 = np.concatenate([x["index"] for x in a[:4]])
    epoch1 = np.concatenate([x["index"] for x in a[4:]])
    assert sorted(epoch0) == sorted(epoch1) == list(range(64))  # each epoch covers all
    assert not np.array_equal(epoch0, epoch1)                    # in a new order
    assert [int(x["epoch"][0]) for x in a] == [0] * 4 + [1] * 4
    c = take(iter(train_dataset(arrays, 16, seed=4, workers=0)), 1)
    assert not np.array_equal(c[0]["index"], a[0]["index"])


def test_same_batches_on_any_worker_count():
    arrays = synthetic(96, crop_pad=2, flip=True)
    base = take(iter(train_dataset(arrays, 32, seed=1, workers=0)), 5)
    it = iter(train_dataset(arrays, 32, seed=1, workers=2))
    for x, y in zip(base, take(it, 5)):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_mid_epoch_resume_sees_the_same_batches():
    arrays = synthetic(100, crop_pad=1)
    make = lambda: iter(train_dataset(arrays, 16, seed=7, workers=0))
    uninterrupted = take(make(), 10)
    first = make()
    take(first, 4)  # mid-epoch: 100 examples = 6.25 batches
    state = json.loads(json.dumps(first.get_state()))  # survives serialisation
    resumed = make()
    resumed.set_state(state)
    for x, y in zip(uninterrupted[4:], take(resumed, 6)):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_prefetched_chunks_and_states_equal_drawing_in_turn():
    """The background thread draws the same batches, and records after each chunk the
    state from which a resumed iterator continues exactly there."""
    arrays = synthetic(100, crop_pad=1)
    make = lambda: iter(train_dataset(arrays, 16, seed=7, workers=0))
    sizes = [3, 1, 2, 3, 1]
    expected, it = [], make()
    for k in sizes:
        expected.append((np.stack([b["image"] for b in take(it, k)]), it.get_state()))
    with ChunkPrefetcher(make(), sizes, lambda bs: np.stack([b["image"] for b in bs])) as c:
        got = list(c)
    assert len(got) == len(sizes)
    for (x, state_x), (y, state_y) in zip(expected, got):
        np.testing.assert_array_equal(x, y)
        assert state_x == state_y
    resumed = make()
    resumed.set_state(got[2][1])  # after 6 batches
    np.testing.assert_array_equal(next(resumed)["image"], expected[3][0][0])


def test_prefetch_errors_reach_the_consumer_and_close_stops_the_thread():
    def put(batches):
        if len(batches) == 2:
            raise ValueError("bad chunk")
        return len(batches)
    chunks = ChunkPrefetcher(_Counter(), [1, 2, 1], put)
    assert next(chunks)[0] == 1
    with pytest.raises(ValueError, match="bad chunk"):
        next(chunks)
    chunks.close()
    endless = ChunkPrefetcher(_Counter(), [1] * 10**6, lambda bs: bs[0], ahead=2)
    assert [next(endless)[0] for _ in range(3)] == [0, 1, 2]
    endless.close()
    assert not endless._thread.is_alive()


class _Counter:
    def __init__(self):
        self.n = -1

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        return self.n

    def get_state(self):
        return self.n


def test_processes_read_disjoint_shards_of_each_global_batch():
    arrays = synthetic(64)
    whole = take(iter(train_dataset(arrays, 16, seed=2, workers=0)), 3)
    parts = [take(iter(train_dataset(arrays, 16, seed=2, workers=0, process_index=p,
                                     process_count=2)), 3) for p in range(2)]
    for i in range(3):
        joined = np.concatenate([parts[0][i]["index"], parts[1][i]["index"]])
        np.testing.assert_array_equal(joined, whole[i]["index"])
    with pytest.raises(BadInput, match="not divisible"):
        train_dataset(arrays, 15, seed=0, workers=0, process_count=2)


def test_evaluation_covers_every_example_exactly_once():
    arrays = cifar_like(load("synthetic:8x8x3:10:64:1000", "test"))
    batches = list(eval_batches(arrays, 128))
    assert len(batches) == 8 and all(len(b["label"]) == 128 for b in batches)
    real = np.concatenate([b["index"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(real, np.arange(1000))
    assert sum(b["mask"].sum() for b in batches) == 1000
    shards = [list(eval_batches(arrays, 128, p, 4)) for p in range(4)]
    total = sum(b["mask"].sum() for s in shards for b in s)
    assert total == 1000


@needs_cifar
def test_cifar10_test_split_evaluation_count():
    batches = eval_batches(cifar_like(load("cifar10", "test")), 128)
    assert sum(int(b["mask"].sum()) for b in batches) == 10_000


def test_pipeline_benchmark_contract():
    out = subprocess.run([sys.executable, "scripts/bench_pipeline.py", "--data",
                          "synthetic:32x32x3:10:512:64", "--workers", "0", "--batches", "3",
                          "--step-repeats", "1", "--models", "lenet5", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("pipeline_img_per_s", "step_img_per_s", "ratio", "workers", "backend"):
        assert key in data
    assert data["ratio"] == pytest.approx(data["pipeline_img_per_s"] / data["step_img_per_s"])


def test_batches_land_sharded_over_the_data_axis():
    code = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cnn_jax.data import load
from cnn_jax.data.keys import IMAGE, LABEL, MASK
from cnn_jax.data.dataset import Dataset
from cnn_jax.data.pipeline import eval_batches, to_global_array
mesh = Mesh(np.array(jax.devices()), ("data",))
sharding = NamedSharding(mesh, P("data"))
arrays = Dataset(load("synthetic:8x8x3:10:64:100", "test"), 8)
batches = [to_global_array({k: b[k] for k in (IMAGE, LABEL, MASK)}, sharding)
           for b in eval_batches(arrays, 32)]
assert len(batches) == 4
b = batches[-1]
assert b["image"].shape == (32, 8, 8, 3) and b["image"].dtype == np.uint8
assert len(b["image"].addressable_shards) == 4
assert {s.data.shape[0] for s in b["image"].addressable_shards} == {8}
assert float(sum(x["mask"].sum() for x in batches)) == 100
np.testing.assert_array_equal(np.asarray(batches[0]["image"]), arrays.source.images[:32])
print("ok")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
