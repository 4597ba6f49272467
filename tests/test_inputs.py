"""The input adaptations a recipe can ask for: LeNet's 28 -> 32 padding and scale,
standardisation, on-device upsampling; and that adding them kept old digests."""
import numpy as np
import jax.numpy as jnp
import pytest

from cnn_jax.errors import BadInput
from cnn_jax.data.dataset import Dataset, subset
from cnn_jax.data.ops import Pad
from cnn_jax.data.sources import Arrays
from cnn_jax.train import TrainConfig
from cnn_jax.train.inputs import make_input_fn, make_normaliser, model_input_shape


def test_lecun_scale_maps_background_and_ink_as_in_the_paper():
    fn = make_input_fn(make_normaliser("lecun", np.zeros((1, 2, 2, 1), np.uint8)))
    out = np.asarray(fn(jnp.array([0, 255], jnp.uint8).reshape(1, 1, 2, 1)))
    np.testing.assert_allclose(out.ravel(), [-0.1, 1.175], rtol=1e-6)


def test_padding_centres_the_digit_in_a_32x32_field():
    images = np.full((3, 28, 28, 1), 200, np.uint8)
    d = Dataset(Arrays(images, np.arange(3), ["a", "b", "c"]), 28, (Pad(2),))
    padded = d.eval_batch(np.arange(3))["image"]
    assert d.image_shape == padded.shape[1:] == (32, 32, 1)
    assert (padded[:, 2:30, 2:30] == 200).all()
    assert padded.sum() == images.sum()  # the border is background (0)
    np.testing.assert_array_equal(d.train_batch(np.arange(3), np.zeros(3), 0)["image"], padded)
    np.testing.assert_array_equal(d.normaliser_images(), padded)


def test_standardisation_gives_zero_mean_unit_variance_per_channel():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 8, 8, 3), np.uint8) // np.array([1, 2, 4], np.uint8)
    y = np.asarray(make_input_fn(make_normaliser("standard", x))(jnp.asarray(x)))
    np.testing.assert_allclose(y.mean((0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(y.std((0, 1, 2)), 1, atol=1e-4)


def test_resize_upsamples_on_the_device_and_keeps_a_constant_image_constant():
    fn = make_input_fn(None, resize=67)
    x = jnp.full((2, 32, 32, 3), 7, jnp.uint8)
    y = fn(x)
    assert y.shape == (2, 67, 67, 3) and model_input_shape((32, 32, 3), 67) == (67, 67, 3)
    np.testing.assert_allclose(np.asarray(y), 7.0, rtol=1e-6)


def test_new_fields_off_keep_the_digest_on_and_change_it():
    base = TrainConfig()
    assert "input_pad" not in base.result_fields() and "resize" not in base.result_fields()
    assert TrainConfig(input_pad=2).digest() != base.digest()
    assert TrainConfig(resize=64).digest() != base.digest()


@pytest.mark.parametrize("field,value,message", [
    ("normalise", "zscore", "must be one of"), ("input_pad", -1, "must be 0 or positive"),
    ("resize", -5, "must be 0 or positive")])
def test_bad_values_are_refused_naming_the_flag(field, value, message):
    with pytest.raises(BadInput, match=f"--{field.replace('_', '-')}: {message}"):
        TrainConfig(**{field: value}).validate()


def test_eval_subset_is_fixed_and_stratified():
    labels = np.repeat(np.arange(10), 100)
    a = Arrays(np.arange(1000, dtype=np.uint8).reshape(1000, 1, 1, 1), labels,
               [str(i) for i in range(10)])
    one, two = subset(a, 200), subset(a, 200)
    assert np.array_equal(one.labels, two.labels) and np.array_equal(one.images, two.images)
    assert np.bincount(one.labels).tolist() == [20] * 10
    assert subset(a, 0) is a and subset(a, 5000) is a
