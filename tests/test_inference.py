"""Label and image warping of ltnet_tf.registration.transfer against VoxelMorph's own SpatialTransformer."""
import itertools

import numpy as np
import pytest

from ltnet_tf.config import LTNetConfig  # noqa: F401,I001  (before TensorFlow: sets TF_USE_LEGACY_KERAS)
from ltnet_tf.registration.transfer import MIXED_CELL, uniform_cell_labels, warp_image, warp_labels
import tensorflow as tf
import voxelmorph as vxm

SHAPE = (9, 10, 11)
LABEL_IDS = np.array([0, 2, 17, 41, 255])  # arbitrary IDs: not 0..n-1


def blocky_label_map(seed=0) -> np.ndarray:
    """Label IDs in 3×3×3 blocks: large uniform regions and boundaries, like an aseg."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(LABEL_IDS, size=[(s + 2) // 3 for s in SHAPE])
    blocks = coarse.repeat(3, 0).repeat(3, 1).repeat(3, 2)
    return blocks[:SHAPE[0], :SHAPE[1], :SHAPE[2]].astype(np.int32)


def random_flow(batch=2, scale=4.0, seed=1) -> np.ndarray:
    """Displacements up to ±scale voxels: many points leave the volume and are clipped."""
    return np.random.default_rng(seed).uniform(-scale, scale, (batch, *SHAPE, 3)).astype(np.float32)


def voxelmorph_onehot_argmax(label_map, flow):
    """The definition: warp each label's indicator linearly (VoxelMorph), then take the argmax.

    Returns the label IDs and the margin between the best and second-best interpolated values.
    """
    onehot = (label_map[..., None] == LABEL_IDS).astype(np.float32)
    onehot = np.repeat(onehot[None], flow.shape[0], axis=0)
    warped = vxm.layers.SpatialTransformer(interp_method="linear", indexing="ij",
                                           fill_value=None)([onehot, flow]).numpy()
    ordered = np.sort(warped, axis=-1)
    return LABEL_IDS[warped.argmax(-1)], ordered[..., -1] - ordered[..., -2]


def test_uniform_cell_labels_matches_a_direct_loop():
    label_map = blocky_label_map()
    cells = uniform_cell_labels(tf.constant(label_map)).numpy()
    expected = np.empty_like(label_map)
    for z, y, x in np.ndindex(*SHAPE):
        corners = {label_map[min(z + dz, SHAPE[0] - 1), min(y + dy, SHAPE[1] - 1),
                             min(x + dx, SHAPE[2] - 1)]
                   for dz, dy, dx in itertools.product((0, 1), repeat=3)}
        expected[z, y, x] = corners.pop() if len(corners) == 1 else MIXED_CELL
    np.testing.assert_array_equal(cells, expected)
    # Both kinds of cell occur, so the tests below exercise both paths of warp_labels.
    assert 0.2 < np.mean(cells == MIXED_CELL) < 0.9


@pytest.mark.parametrize("scale", [0.7, 4.0])
def test_warp_labels_equals_onehot_linear_warp_then_argmax(scale):
    label_map, flow = blocky_label_map(), random_flow(scale=scale)
    expected, margin = voxelmorph_onehot_argmax(label_map, flow)
    got = warp_labels(tf.constant(label_map), tf.constant(flow)).numpy()
    assert got.shape == expected.shape and got.dtype == np.int32
    decided = margin > 1e-5  # exact ties may go either way
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(got[decided], expected[decided])
    # The precomputed cell labels give the same answer.
    cells = uniform_cell_labels(tf.constant(label_map))
    np.testing.assert_array_equal(
        warp_labels(tf.constant(label_map), tf.constant(flow), cells).numpy(), got)


def test_warp_labels_zero_flow_and_single_label():
    label_map = blocky_label_map()
    zero = np.zeros((1, *SHAPE, 3), np.float32)
    np.testing.assert_array_equal(warp_labels(tf.constant(label_map), zero).numpy()[0], label_map)
    single = np.full(SHAPE, 41, np.int32)  # no mixed cell at all: the vote runs on nothing
    np.testing.assert_array_equal(warp_labels(tf.constant(single), random_flow()).numpy(), 41)


def test_warp_image_equals_voxelmorph_linear():
    image = np.random.default_rng(2).uniform(0, 1, SHAPE).astype(np.float32)
    flow = random_flow()
    expected = vxm.layers.SpatialTransformer(interp_method="linear", indexing="ij", fill_value=None)(
        [np.repeat(image[None, ..., None], 2, axis=0), flow]).numpy()
    np.testing.assert_allclose(warp_image(tf.constant(image), tf.constant(flow)).numpy(), expected,
                               atol=1e-5)
