"""Tests of ltnet_tf.registration.refinement: the loss it optimises is the training objective, it lowers it, and it
returns displacements on the full grid in full voxels (tiny volumes)."""
import numpy as np
import pytest

from ltnet_tf.config import LTNetConfig
from ltnet_tf.registration import losses, transfer as inference
from ltnet_tf.registration.networks import ForwardGenerator
from ltnet_tf.registration.refinement import (AtlasSampler, FixedScanNCC, Refinement, WindowSums,
                                              smoothness, to_grid)
from ltnet_tf.registration.transfer import LabelTransfer

import tensorflow as tf  # noqa: E402  (after ltnet_tf, which selects Keras 2)

SHAPE = (24, 28, 32)


def config_for(shape=SHAPE, downsample=2, **changes) -> LTNetConfig:
    return LTNetConfig().replace(atlas_shape=list(shape), label_ids=[0, 1], downsample=downsample,
                                 enc_features=[8, 8], dec_features=[8, 8, 8, 8], **changes)


def blob(shape, centre_shift=(0.0, 0.0, 0.0), sigma=4.0) -> np.ndarray:
    """A Gaussian blob at the centre of ``shape`` moved by ``centre_shift`` voxels, plus a ramp so
    that NCC windows away from the blob still vary."""
    axes = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    squared = sum((a - (s - 1) / 2 - c) ** 2 for a, s, c in zip(axes, shape, centre_shift))
    return (np.exp(-squared / (2 * sigma ** 2)) + 0.05 * axes[2] / shape[2]).astype(np.float32)


def random_flow(shape, scale, seed=0, batch=1) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(0.0, scale, (batch, *shape, 3)).astype(np.float32))


# ------------------------------------------------------------------------------- same loss terms
@pytest.mark.parametrize("window", [9, 5])
def test_fixed_scan_ncc_equals_local_ncc(window):
    rng = np.random.default_rng(1)
    scan = tf.constant(rng.random((2, 12, 14, 16), np.float32))
    moved = tf.constant(rng.random((2, 12, 14, 16), np.float32) * 0.5 + scan * 0.5)
    ncc = FixedScanNCC((12, 14, 16), window)
    expected = losses.LocalNCC(window)(scan[..., None], moved[..., None])
    np.testing.assert_allclose(ncc(ncc.scan_sums(scan), moved), expected, rtol=0, atol=1e-5)
    assert float(tf.reduce_min(expected)) > 0.1  # not a trivially perfect match


def test_window_sums_are_zero_padded_box_sums():
    volume = np.random.default_rng(2).random((1, 7, 8, 9)).astype(np.float32)
    padded = np.pad(volume[0], 1)
    expected = sum(padded[dz:dz + 7, dy:dy + 8, dx:dx + 9]
                   for dz in range(3) for dy in range(3) for dx in range(3))
    np.testing.assert_allclose(WindowSums((7, 8, 9), 3)(volume)[0], expected, rtol=1e-5)


@pytest.mark.parametrize("for_xla", [True, False])
def test_smoothness_equals_losses_smoothness(for_xla):
    flow = random_flow((10, 11, 12), 2.0, batch=2)
    np.testing.assert_allclose(smoothness(flow, for_xla), losses.smoothness(flow), rtol=1e-5)


def test_sampler_equals_warp_image_inside_and_beyond_the_volume():
    image = np.random.default_rng(3).random((10, 11, 12)).astype(np.float32)
    flow = random_flow((10, 11, 12), 4.0, batch=2)  # many points fall outside and are clipped
    expected = inference.warp_image(tf.constant(image), flow)[..., 0]
    np.testing.assert_allclose(AtlasSampler(image)(flow), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_loss_is_the_training_objective(jit_compile):
    """Refinement.loss == losses.LocalNCC(scan, warped atlas) + weight_smooth * losses.smoothness."""
    config = config_for()
    atlas, scan = blob(SHAPE), blob(SHAPE, (2.0, -1.0, 0.0))
    refinement = Refinement(config, atlas, factor=2, weight_smooth=0.7, jit_compile=jit_compile)
    scan_grid = to_grid(tf.constant(scan[None, ..., None]), 2)
    flow = random_flow(refinement.grid_shape, 1.0)
    actual = refinement.fine.loss(refinement.fine.ncc.scan_sums(scan_grid), flow)
    atlas_grid = to_grid(tf.constant(atlas[None, ..., None]), 2)[0]
    expected = (losses.LocalNCC(config.ncc_window)(scan_grid[..., None],
                                                   inference.warp_image(atlas_grid, flow))
                + 0.7 * losses.smoothness(flow))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- what it returns
def test_zero_steps_returns_the_generator_displacement():
    config = config_for(downsample=4)
    flow_working = random_flow(config.working_shape(), 1.0, batch=2)
    scans = tf.constant(np.stack([blob(SHAPE), blob(SHAPE, (1, 1, 1))])[..., None])
    refinement = Refinement(config, blob(SHAPE), steps=0, factor=2, coarse_steps=0)
    assert refinement.coarse is not None  # a coarse stage that runs 0 steps
    outputs = refinement(scans, flow_working, full_grid=True)
    expected = inference.resample_displacement(flow_working, config.downsample, SHAPE)
    np.testing.assert_array_equal(outputs["flow"], expected)
    np.testing.assert_array_equal(outputs["loss"], outputs["loss_start"])


def shifted_texture_pair(shape, shift: int, margin: int = 4):
    """(atlas, scan): smooth random texture, the scan = the atlas moved by ``shift`` voxels along
    the last axis (cut from one larger volume, so the shift is exact; a texture rather than a blob
    so that every window fixes the displacement in all three directions)."""
    rng = np.random.default_rng(0)
    texture = rng.normal(size=[s + 2 * margin for s in shape])
    kernel = np.exp(-np.arange(-6, 7) ** 2 / (2 * 2.0 ** 2))
    for axis in range(3):
        texture = np.apply_along_axis(np.convolve, axis, texture, kernel, mode="same")
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    depth, height, width = shape

    def cut(offset):
        return texture[margin:margin + depth, margin:margin + height,
                       margin + offset:margin + offset + width].astype(np.float32)

    return cut(0), cut(-shift)


@pytest.mark.parametrize("downsample,factor", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_refinement_lowers_the_loss_and_moves_in_full_voxels(downsample, factor):
    """The scan is the atlas moved by +2 voxels: starting from a zero displacement, the refined one
    pulls from 2 voxels back (-2 full voxels, VoxelMorph's pull convention) at every grid factor
    and network downsampling."""
    config = config_for(downsample=downsample)
    atlas, scan = shifted_texture_pair(SHAPE, 2)
    refinement = Refinement(config, atlas, steps=60, factor=factor, learning_rate=0.25,
                            weight_smooth=1.0, coarse_steps=0)
    flow_working = tf.zeros([1, *config.working_shape(), 3])
    outputs = refinement(tf.constant(scan[None, ..., None]), flow_working, full_grid=True)
    assert outputs["flow"].shape == (1, *SHAPE, 3)
    assert float(outputs["loss"][0]) < 0.2 * float(outputs["loss_start"][0])
    centre = outputs["flow"][0, 6:-6, 6:-6, 6:-6].numpy().reshape(-1, 3)
    np.testing.assert_allclose(centre.mean(axis=0), [0.0, 0.0, -2.0], atol=0.1)


def test_coarse_to_fine_finds_the_shift_with_fewer_fine_steps():
    config = config_for(downsample=4)
    atlas, scan = shifted_texture_pair(SHAPE, 2)
    scan = tf.constant(scan[None, ..., None])
    flow_working = tf.zeros([1, *config.working_shape(), 3])
    options = dict(steps=15, factor=1, learning_rate=0.25, weight_smooth=1.0)
    fine_only = Refinement(config, atlas, coarse_steps=0, **options)(scan, flow_working,
                                                                     full_grid=True)
    coarse_to_fine = Refinement(config, atlas, coarse_steps=40, **options)(scan, flow_working,
                                                                           full_grid=True)
    np.testing.assert_allclose(coarse_to_fine["loss_start"], fine_only["loss_start"])
    assert float(coarse_to_fine["loss"][0]) < float(fine_only["loss"][0])
    centre = coarse_to_fine["flow"][0, 6:-6, 6:-6, 6:-6].numpy().reshape(-1, 3)
    np.testing.assert_allclose(centre.mean(axis=0), [0.0, 0.0, -2.0], atol=0.15)


def test_constant_generator_displacement_is_in_full_voxels():
    """Working voxel units are converted: a constant working displacement v is v * downsample."""
    for downsample, factor in [(2, 1), (4, 2)]:
        config = config_for(downsample=downsample)
        flow_working = tf.fill([1, *config.working_shape(), 3], 0.5)
        outputs = Refinement(config, blob(SHAPE), steps=0, factor=factor, coarse_steps=0)(
            tf.constant(blob(SHAPE)[None, ..., None]), flow_working, full_grid=True)
        np.testing.assert_allclose(outputs["flow"], 0.5 * downsample, rtol=1e-6)


def test_scans_of_a_batch_are_refined_independently():
    config = config_for()
    scans = np.stack([blob(SHAPE, (0, 0, 2)), blob(SHAPE, (1, -1, 0))])[..., None]
    flow_working = random_flow(config.working_shape(), 0.5, batch=2)
    refinement = Refinement(config, blob(SHAPE), steps=5, factor=2)
    together = refinement(tf.constant(scans), flow_working, full_grid=True)
    alone = refinement(tf.constant(scans[1:]), flow_working[1:], full_grid=True)
    # Kernels over a batch of 2 and of 1 sum in other orders (last-bit differences); Adam divides
    # by the root of tiny second moments where a gradient is near zero, so a few voxels move by up
    # to ~4e-4 voxel. A coupling between the scans of a batch would move every voxel, by far more.
    flow_difference = np.abs(together["flow"][1] - alone["flow"][0])
    assert flow_difference.max() < 2e-3 and np.mean(flow_difference > 1e-4) < 0.01
    np.testing.assert_allclose(together["loss"][1], alone["loss"][0], rtol=0, atol=1e-5)


def test_with_and_without_xla_the_same_refinement():
    config = config_for()
    scans = tf.constant(blob(SHAPE, (0, 0, 2))[None, ..., None])
    flow_working = random_flow(config.working_shape(), 0.5)
    compiled, plain = (Refinement(config, blob(SHAPE), steps=5, jit_compile=jit)(
        scans, flow_working, full_grid=True) for jit in (True, False))
    np.testing.assert_allclose(compiled["flow"], plain["flow"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(compiled["loss"], plain["loss"], rtol=0, atol=1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="factor"):
        Refinement(config_for(), blob(SHAPE), factor=0)
    with pytest.raises(ValueError, match="steps"):
        Refinement(config_for(), blob(SHAPE), steps=-1)
    with pytest.raises(ValueError, match="coarse_steps"):
        Refinement(config_for(), blob(SHAPE), coarse_steps=-1)


# ------------------------------------------------------------------------------- label transfer
def test_label_transfer_with_refinement():
    config = config_for(downsample=2)
    tf.keras.utils.set_random_seed(0)
    generator = ForwardGenerator.from_ltnet_config(config)
    atlas = blob(SHAPE) * 1000
    atlas_labels = (blob(SHAPE) > 0.4).astype(np.int32)
    label_transfer = LabelTransfer(generator, config, atlas, atlas_labels)
    scan = tf.constant(blob(SHAPE, (0, 0, 2))[None, ..., None] * 500 + 7)
    unchanged = label_transfer.transfer(
        scan, refinement=Refinement.for_label_transfer(label_transfer, steps=0, coarse_steps=0))
    plain = label_transfer.transfer(scan)
    for name in ("segmentation", "flow", "warped_atlas"):
        np.testing.assert_allclose(unchanged[name], plain[name], rtol=0, atol=1e-6)
    refined = label_transfer.segment(
        scan, refinement=Refinement.for_label_transfer(label_transfer, steps=40, factor=1,
                                                       weight_smooth=1.0))
    reference = (blob(SHAPE, (0, 0, 2)) > 0.4)
    dice = lambda seg: 2 * (seg & reference).sum() / (seg.sum() + reference.sum())  # noqa: E731
    assert dice(refined["segmentation"][0].numpy() == 1) > dice(plain["segmentation"][0].numpy() == 1)
