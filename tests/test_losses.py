"""The loss terms of ltnet_tf.registration.losses against NumPy written straight from the paper's equations."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from ltnet_tf.registration import losses  # noqa: I001  (before TensorFlow: sets TF_USE_LEGACY_KERAS)
import tensorflow as tf

SPATIAL_AXES = (1, 2, 3)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _correlated_pair(shape, batch=2, seed=0):
    """Random target u and a moved image v partly correlated with it, [batch, *shape, 1] float32."""
    rng = _rng(seed)
    target = rng.uniform(0, 1, (batch, *shape, 1))
    moved = 0.6 * target + 0.4 * rng.uniform(0, 1, (batch, *shape, 1))
    return target.astype(np.float32), moved.astype(np.float32)


def _smooth_field(shape, batch=2, amplitude=2.0, seed=0):
    """A smooth random displacement [batch, *shape, 3] of about `amplitude` voxels."""
    noise = _rng(seed).normal(size=(batch, *shape, 3))
    field = ndimage.gaussian_filter(noise, sigma=(0, 2, 2, 2, 0))
    return (amplitude * field / np.abs(field).max()).astype(np.float32)


# ------------------------------------------------------------------------------------------ L_sim
def numpy_local_ncc(target, moved, window, eps=1e-5):
    """Eq. 1 with explicit n³ window sums (zero padding, means over n³): (loss [B], cc [B, D, H, W])."""
    half = window // 2
    window_axes = (-3, -2, -1)
    correlations = []
    for u, v in zip(target[..., 0].astype(np.float64), moved[..., 0].astype(np.float64)):
        u_windows = sliding_window_view(np.pad(u, half), (window,) * 3)  # [D, H, W, n, n, n]
        v_windows = sliding_window_view(np.pad(v, half), (window,) * 3)
        u_dev = u_windows - u_windows.mean(axis=window_axes, keepdims=True)
        v_dev = v_windows - v_windows.mean(axis=window_axes, keepdims=True)
        cross = (u_dev * v_dev).sum(axis=window_axes)
        u_var = (u_dev ** 2).sum(axis=window_axes)
        v_var = (v_dev ** 2).sum(axis=window_axes)
        correlations.append(cross ** 2 / (u_var * v_var + eps))
    correlations = np.stack(correlations)
    return 1.0 - correlations.mean(axis=SPATIAL_AXES), correlations


@pytest.mark.parametrize("shape, window", [
    ((16, 16, 16), 9),
    ((12, 14, 16), 9),
    ((16, 16, 16), 3),
    ((12, 14, 16), 5),
])
def test_local_ncc_matches_equation_1(shape, window):
    target, moved = _correlated_pair(shape)
    expected_loss, expected_cc = numpy_local_ncc(target, moved, window)
    ncc = losses.LocalNCC(window)

    loss = ncc(tf.constant(target), tf.constant(moved)).numpy()
    cc = ncc.correlation(tf.constant(target), tf.constant(moved)).numpy()

    assert loss.shape == (2,)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-4)
    np.testing.assert_allclose(cc.reshape(expected_cc.shape), expected_cc, atol=1e-4)
    # The two batch elements are different data, so a batch mix-up would show.
    assert abs(expected_loss[0] - expected_loss[1]) > 1e-4


def test_local_ncc_is_symmetric_in_its_arguments():
    target, moved = _correlated_pair((12, 14, 16))
    ncc = losses.LocalNCC(9)
    np.testing.assert_allclose(ncc(target, moved).numpy(), ncc(moved, target).numpy(), rtol=1e-5)


@pytest.mark.parametrize("window", [3, 5, 9])
def test_local_ncc_of_identical_images_is_zero(window):
    target, _ = _correlated_pair((16, 16, 16))
    loss = losses.LocalNCC(window)(target, target).numpy()
    np.testing.assert_allclose(loss, 0.0, atol=1e-4)


def test_local_ncc_of_anti_correlated_images_is_zero():
    """Eq. 1 squares the cross term, so v = -u is a perfect match (unlike vxm 0.2's clamped NCC)."""
    target, _ = _correlated_pair((16, 16, 16))
    loss = losses.LocalNCC(9)(target, -target).numpy()
    np.testing.assert_allclose(loss, 0.0, atol=1e-4)


def test_local_ncc_of_independent_images_is_near_one_and_in_unit_interval():
    # Zero-mean data: with zero padding, positive images would share the padding's step edge.
    rng = _rng(1)
    target = rng.normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    moved = rng.normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    loss = losses.LocalNCC(9)(target, moved).numpy()
    assert np.all(loss > 0.9) and np.all(loss <= 1.0)


# --------------------------------------------------------------------------------------- L_smooth
def test_smoothness_matches_equations_2_3():
    displacement = _rng(2).normal(size=(2, 12, 14, 16, 3)).astype(np.float32)
    expected = np.mean([np.mean(np.diff(displacement, axis=axis) ** 2, axis=(1, 2, 3, 4))
                        for axis in SPATIAL_AXES], axis=0)
    np.testing.assert_allclose(losses.smoothness(tf.constant(displacement)).numpy(), expected,
                               rtol=1e-5)


def test_smoothness_of_constant_field_is_zero():
    displacement = np.broadcast_to(np.float32([1.5, -2.0, 0.5]), (2, 8, 8, 8, 3))
    np.testing.assert_allclose(losses.smoothness(tf.constant(displacement)).numpy(), 0.0)


# -------------------------------------------------------------------------------------------- adv
def _softplus(x):
    return np.logaddexp(0.0, x)


@pytest.mark.parametrize("mode", ["lsgan", "bce"])
def test_adversarial_losses_match_numpy(mode):
    rng = _rng(3)
    real_logits = rng.normal(size=(2, 4, 4, 4, 1)).astype(np.float32)
    fake_logits = rng.normal(size=(2, 4, 4, 4, 1)).astype(np.float32)
    per_example = (1, 2, 3, 4)
    if mode == "lsgan":
        expected_g = np.mean((fake_logits - 1) ** 2, axis=per_example)
        expected_d = 0.5 * (np.mean((real_logits - 1) ** 2, axis=per_example)
                            + np.mean(fake_logits ** 2, axis=per_example))
    else:  # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x)
        expected_g = np.mean(_softplus(-fake_logits), axis=per_example)
        expected_d = 0.5 * (np.mean(_softplus(-real_logits), axis=per_example)
                            + np.mean(_softplus(fake_logits), axis=per_example))

    adversarial = losses.Adversarial(mode)
    g_loss = adversarial.generator_loss(tf.constant(fake_logits)).numpy()
    d_loss = adversarial.discriminator_loss(tf.constant(real_logits), tf.constant(fake_logits)).numpy()

    np.testing.assert_allclose(g_loss, expected_g, rtol=1e-5)
    np.testing.assert_allclose(d_loss, expected_d, rtol=1e-5)
    assert g_loss.shape == d_loss.shape == (2,)
    assert np.all(g_loss > 0) and np.all(d_loss > 0)


def test_adversarial_rejects_unknown_mode():
    with pytest.raises(ValueError, match="wgan"):
        losses.Adversarial("wgan")


# ---------------------------------------------------------------------------------------- cyc_img
def test_image_cycle_is_mean_absolute_difference():
    rng = _rng(4)
    atlas = rng.normal(size=(2, 8, 10, 12, 1)).astype(np.float32)
    cycled = rng.normal(size=(2, 8, 10, 12, 1)).astype(np.float32)
    expected = np.mean(np.abs(cycled - atlas), axis=(1, 2, 3, 4))
    np.testing.assert_allclose(losses.image_cycle(atlas, cycled).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.image_cycle(atlas, atlas).numpy(), 0.0)


# -------------------------------------------------------------------------------------- cyc_label
def numpy_soft_dice_loss(reference, predicted, smooth=1e-5):
    reference, predicted = reference[..., 1:], predicted[..., 1:]
    overlap = np.sum(reference * predicted, axis=SPATIAL_AXES)
    total = np.sum(reference ** 2, axis=SPATIAL_AXES) + np.sum(predicted ** 2, axis=SPATIAL_AXES)
    return 1.0 - np.mean((2 * overlap + smooth) / (total + smooth), axis=-1)


def _onehot(labels, n_labels):
    return np.eye(n_labels, dtype=np.float32)[labels]


def test_soft_dice_loss_matches_numpy_on_soft_labels():
    rng = _rng(5)
    reference = _onehot(rng.integers(0, 4, (2, 8, 8, 8)), 4)
    predicted = rng.dirichlet(np.ones(4), size=(2, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(losses.soft_dice_loss(reference, predicted).numpy(),
                               numpy_soft_dice_loss(reference, predicted), rtol=1e-5)


def test_soft_dice_loss_is_zero_for_identical_soft_maps():
    # Working-resolution atlas labels are soft fractions: a map must still match itself exactly.
    soft = _rng(6).dirichlet(np.ones(4), size=(2, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(losses.soft_dice_loss(soft, soft).numpy(), 0.0, atol=1e-6)


def test_soft_dice_loss_perfect_and_disjoint():
    labels = np.zeros((1, 8, 8, 8), np.int64)
    labels[:, 2:5, 2:5, 2:5] = 1
    labels[:, 5:7, 5:7, 5:7] = 2
    reference = _onehot(labels, 3)
    np.testing.assert_allclose(losses.soft_dice_loss(reference, reference).numpy(), 0.0, atol=1e-6)

    # Every foreground label in a place the other map calls background.
    moved = _onehot(np.roll(labels, 4, axis=1), 3)
    assert np.all((reference[..., 1:] * moved[..., 1:]).sum() == 0)
    np.testing.assert_allclose(losses.soft_dice_loss(reference, moved).numpy(), 1.0, atol=1e-6)


def test_soft_dice_loss_counts_absent_label_as_perfect():
    labels = np.zeros((1, 8, 8, 8), np.int64)
    labels[:, 2:5, 2:5, 2:5] = 1  # label 2 is absent from both maps
    reference = _onehot(labels, 3)
    np.testing.assert_allclose(losses.soft_dice_loss(reference, reference).numpy(), 0.0, atol=1e-6)
    disjoint = _onehot(np.roll(labels, 4, axis=2), 3)
    # Label 1 has Dice 0, label 2 has Dice 1: the mean Dice is 1/2.
    np.testing.assert_allclose(losses.soft_dice_loss(reference, disjoint).numpy(), 0.5, atol=1e-6)


# --------------------------------------------------------------------------------------- cyc_flow
def _constant_field(shift, shape=(12, 14, 16), batch=2):
    return np.broadcast_to(np.float32(shift), (batch, *shape, 3)).copy()


def test_transformation_cycle_of_exact_inverse_pair_is_zero():
    shift = [1.5, -2.0, 0.75]
    cycle = losses.transformation_cycle(_constant_field(shift),
                                        _constant_field(np.negative(shift))).numpy()
    assert cycle.shape == (2,)
    assert np.all(np.abs(cycle) < 1e-6)


def test_transformation_cycle_is_positive_for_non_inverse_pairs():
    shift = np.float32([1.5, -2.0, 0.75])
    twice = losses.transformation_cycle(_constant_field(shift), _constant_field(shift)).numpy()
    # Composing s with s gives 2s everywhere (the border replicates the constant field).
    np.testing.assert_allclose(twice, np.sum((2 * shift) ** 2), rtol=1e-5)

    field = _smooth_field((12, 14, 16))
    negated = losses.transformation_cycle(field, -field).numpy()
    # -Δp is not the inverse of a spatially varying Δp: the composition is not zero.
    assert np.all(negated > 1e-3)


def test_compose_displacements_with_integer_backward_shift():
    forward = _rng(6).normal(size=(2, 12, 14, 16, 3)).astype(np.float32)  # spatially varying
    shift = np.int64([2, -1, 3])
    composed = losses.compose_displacements(forward, _constant_field(shift)).numpy()

    # c(p) = Δp_B(p) + Δp_F(p + Δp_B(p)) where p + Δp_B(p) stays inside the volume.
    expected = shift + forward[:, 2:, :-1, 3:]
    np.testing.assert_allclose(composed[:, :-2, 1:, :-3], expected, rtol=1e-6, atol=1e-6)


def test_compose_displacements_with_varying_backward_field_matches_trilinear_resampling():
    forward = _smooth_field((12, 14, 16), seed=7)
    backward = _smooth_field((12, 14, 16), amplitude=3.0, seed=8)
    composed = losses.compose_displacements(forward, backward).numpy()

    grid = np.stack(np.meshgrid(*map(np.arange, (12, 14, 16)), indexing="ij"), axis=-1)
    expected = np.empty_like(forward)
    for b in range(2):
        points = np.moveaxis(grid + backward[b], -1, 0)  # where Δp_B pulls from
        for c in range(3):
            resampled = ndimage.map_coordinates(forward[b, ..., c], points, order=1, mode="nearest")
            expected[b, ..., c] = backward[b, ..., c] + resampled
    np.testing.assert_allclose(composed, expected, atol=1e-4)


def test_labels_warped_by_the_composed_displacement_equal_two_successive_warps():
    # The model's label cycle warps y_x once by c = compose(Δp_F, Δp_B) instead of twice.
    import voxelmorph as vxm
    labels = _rng(11).integers(0, 3, (1, 12, 12, 12))
    onehot = tf.constant(np.eye(3, dtype=np.float32)[labels])
    forward = tf.constant(np.broadcast_to(np.float32([2, -1, 1]), (1, 12, 12, 12, 3)))
    backward = tf.constant(np.broadcast_to(np.float32([-1, 3, 0]), (1, 12, 12, 12, 3)))
    warp = vxm.layers.SpatialTransformer(fill_value=None)
    twice = warp([warp([onehot, forward]), backward]).numpy()
    once = warp([onehot, losses.compose_displacements(forward, backward)]).numpy()
    inner = (slice(None), slice(3, -3), slice(3, -3), slice(3, -3))  # clipping differs at borders
    np.testing.assert_allclose(once[inner], twice[inner], atol=1e-6)
    assert not np.allclose(once[inner], onehot.numpy()[inner])  # the shifts do move the labels
