"""Tests of ltnet_tf.io.evaluation: Dice and the Jacobian determinant / folding checks."""
import numpy as np
import pytest

from ltnet_tf.io import evaluation


def test_identity_has_determinant_one_and_no_folds():
    flow = np.zeros((6, 7, 8, 3))
    np.testing.assert_allclose(evaluation.jacobian_determinant(flow), 1.0)
    assert evaluation.folding_fraction(flow) == 0.0


def test_linear_displacement_has_its_determinant():
    """u(x) = A x: det(I + A) everywhere, borders included (one-sided differences are exact)."""
    matrix = np.array([[0.2, 0.1, 0.0], [-0.3, 0.5, 0.1], [0.0, 0.2, -0.4]])
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in (6, 7, 8)],
                                indexing="ij"), -1)
    flow = grid @ matrix.T
    np.testing.assert_allclose(evaluation.jacobian_determinant(flow),
                               np.linalg.det(np.eye(3) + matrix), rtol=1e-10)


def test_folds_are_counted_inside_the_mask_only():
    """A mirror displacement in one slab (x -> -x there) folds it: those voxels have det < 0."""
    shape = (10, 6, 6)
    flow = np.zeros((*shape, 3))
    z = np.arange(shape[0], dtype=float)
    # Along z the map is x + u(x) = 8 - x for z in [3, 6]: decreasing there, so the slab folds.
    mapped = np.where((z >= 3) & (z <= 6), 9.0 - z, z)
    flow[..., 0] = (mapped - z)[:, None, None]
    determinant = evaluation.jacobian_determinant(flow)
    assert (determinant[4:6] < 0).all() and (determinant[:2] > 0).all()
    folded = (determinant <= 0).mean()
    assert 0 < folded < 1
    assert evaluation.folding_fraction(flow) == pytest.approx(folded)
    mask = np.zeros(shape, bool)
    mask[4:6] = True
    assert evaluation.folding_fraction(flow, mask) == 1.0
    mask[:] = False
    mask[0] = True
    assert evaluation.folding_fraction(flow, mask) == 0.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="displacement"):
        evaluation.jacobian_determinant(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="mask"):
        evaluation.folding_fraction(np.zeros((4, 4, 4, 3)), np.ones((4, 4, 3), bool))


def test_dice_per_label_and_mean():
    segmentation = np.array([0, 1, 1, 2, 2, 2])
    reference = np.array([0, 1, 2, 2, 2, 0])
    scores = evaluation.dice_per_label(segmentation, reference, [0, 1, 2, 3])
    assert scores[1] == pytest.approx(2 / 3) and scores[2] == pytest.approx(2 * 2 / 6)
    assert np.isnan(scores[3])
    assert evaluation.mean_dice(scores, [1, 2, 3]) == pytest.approx((2 / 3 + 2 / 3) / 2)
