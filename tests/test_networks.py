"""G_F, G_B and the discriminator of ltnet_tf.registration.networks: shapes, VoxelMorph compatibility, reloading."""
import numpy as np
import pytest

from ltnet_tf.config import LTNetConfig  # noqa: I001  (before TensorFlow: sets TF_USE_LEGACY_KERAS)
from ltnet_tf.registration.networks import BackwardGenerator, ForwardGenerator, build_discriminator
import tensorflow as tf
import voxelmorph as vxm

SLIM = dict(enc_features=[8, 8], dec_features=[8, 8, 8, 8], disc_features=[4, 8])


def _config(**changes) -> LTNetConfig:
    return LTNetConfig().replace(**{**SLIM, "atlas_shape": [16, 16, 16], **changes})


def _pair(config: LTNetConfig, batch: int = 2, seed: int = 0):
    """A random (source, target) pair on the working grid, [batch, *working_shape, 1] each."""
    rng = np.random.default_rng(seed)
    shape = (batch, *config.working_shape(), 1)
    return (rng.uniform(0, 1, shape).astype(np.float32),
            rng.uniform(0, 1, shape).astype(np.float32))


# Non-cubic and downsampled grids check that the networks are built on config.working_shape().
@pytest.mark.parametrize("changes, working_shape", [
    (dict(), (16, 16, 16)),
    (dict(atlas_shape=[13, 12, 20]), (16, 12, 20)),
    (dict(downsample=2), (8, 8, 8)),
])
@pytest.mark.parametrize("generator_class", [ForwardGenerator, BackwardGenerator])
def test_generator_outputs_and_type(generator_class, changes, working_shape):
    config = _config(**changes)
    assert tuple(config.working_shape()) == working_shape
    generator = generator_class.from_ltnet_config(config)
    assert isinstance(generator, vxm.networks.VxmDense)

    warped, displacement = generator(list(_pair(config)))
    assert tuple(warped.shape) == (2, *working_shape, 1)
    assert tuple(displacement.shape) == (2, *working_shape, 3)


def test_generators_have_distinct_layer_names():
    """G_F and G_B live in one model: their weights must not collide by name."""
    config = _config()
    forward = ForwardGenerator.from_ltnet_config(config)
    backward = BackwardGenerator.from_ltnet_config(config)
    forward_names = {v.name for v in forward.weights}
    backward_names = {v.name for v in backward.weights}
    assert forward_names and not forward_names & backward_names


@pytest.mark.parametrize("generator_class", [ForwardGenerator, BackwardGenerator])
def test_zero_displacement_leaves_source_unchanged(generator_class):
    config = _config()
    generator = generator_class.from_ltnet_config(config)
    flow_layer = generator.get_layer(f"{generator.name}_flow")
    flow_layer.set_weights([np.zeros_like(w) for w in flow_layer.get_weights()])

    source, target = _pair(config)
    warped, displacement = generator([source, target])
    np.testing.assert_array_equal(displacement.numpy(), 0.0)
    np.testing.assert_allclose(warped.numpy(), source, atol=1e-6)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")  # VoxelMorph's format
@pytest.mark.parametrize("int_steps", [0, 7])
def test_forward_generator_h5_reloads_with_voxelmorph(tmp_path, int_steps):
    config = _config(int_steps=int_steps)
    generator = ForwardGenerator.from_ltnet_config(config)
    # Non-trivial weights everywhere, so a weight that failed to load would show.
    rng = np.random.default_rng(1)
    generator.set_weights([rng.normal(scale=0.1, size=w.shape).astype(np.float32)
                           for w in generator.get_weights()])
    path = str(tmp_path / "forward_generator.h5")
    generator.save(path)

    reloaded = vxm.networks.VxmDense.load(path)
    assert isinstance(reloaded, vxm.networks.VxmDense)

    inputs = list(_pair(config))
    warped, displacement = (t.numpy() for t in generator(inputs))
    reloaded_warped, reloaded_displacement = (t.numpy() for t in reloaded(inputs))
    assert np.abs(displacement).max() > 1e-2  # a real, non-identity warp is being compared
    assert np.array_equal(displacement, reloaded_displacement)
    assert np.array_equal(warped, reloaded_warped)


@pytest.mark.parametrize("changes, patch_shape", [
    (dict(), (4, 4, 4)),
    (dict(atlas_shape=[13, 12, 20]), (4, 3, 5)),
    (dict(disc_features=[4, 8, 8]), (2, 2, 2)),
])
def test_discriminator_outputs_patch_logits(changes, patch_shape):
    config = _config(**changes)
    discriminator = build_discriminator(config)
    scan, _ = _pair(config)
    logits = discriminator(scan)
    assert tuple(logits.shape) == (2, *patch_shape, 1)
    assert logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))


def test_discriminator_logits_are_float32_under_mixed_precision():
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        discriminator = build_discriminator(_config())
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    assert discriminator.output.dtype == tf.float32


@pytest.mark.parametrize("shape", [(6, 4, 8), (5, 7, 4)])
def test_space_to_depth_then_dense_is_a_kernel2_stride2_conv(shape):
    """The discriminator's downsampling equals Conv3D(kernel 2, stride 2), zero padding at the end
    for odd sizes, with the same weights."""
    from ltnet_tf.registration.networks import SpaceToDepth3D
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, *shape, 3)).astype(np.float32)
    kernel = rng.normal(size=(2, 2, 2, 3, 5)).astype(np.float32)
    blocks = SpaceToDepth3D()(features)
    assert tuple(blocks.shape) == (2, *[(n + 1) // 2 for n in shape], 24)
    ours = tf.tensordot(blocks, kernel.reshape(24, 5), axes=1)
    padded = np.pad(features, [(0, 0)] + [(0, n % 2) for n in shape] + [(0, 0)])
    reference = tf.nn.conv3d(padded, kernel, strides=[1, 2, 2, 2, 1], padding="VALID")
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)
