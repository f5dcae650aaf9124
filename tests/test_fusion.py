"""Multi-atlas label fusion (ltnet_tf.registration.fusion): the vote, locally weighted voting, joint label
fusion."""
import itertools

import numpy as np
import pytest
from scipy import ndimage

from ltnet_tf.registration import fusion, transfer as inference

SHAPE = (16, 20, 24)


def reference_vote(candidates, weights=None):
    """Explicit per-point totals of every label (a one-hot sum); ties to the lowest atlas index."""
    candidates = np.asarray(candidates)
    weights = np.ones(candidates.shape) if weights is None else np.asarray(weights, np.float64)
    fused = []
    for n in range(candidates.shape[1]):
        totals = {}
        for k in range(candidates.shape[0]):
            totals[candidates[k, n]] = totals.get(candidates[k, n], 0.0) + weights[k, n]
        best = max(totals.values())
        fused.append(next(label for label in candidates[:, n]
                          if np.isclose(totals[label], best, rtol=0, atol=1e-6)))
    return np.array(fused, np.int32)


def smooth_field(rng, sigma=1.5, shape=SHAPE):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field / field.std()).astype(np.float32)


# ------------------------------------------------------------------------------------ the vote
def test_two_atlases_fuse_to_the_heavier_label():
    candidates = np.array([[1, 2, 3, 9], [1, 5, 4, 9]])
    weights = np.array([[0.4, 0.7, 0.2, 0.5], [0.6, 0.3, 0.8, 0.5]], np.float32)
    np.testing.assert_array_equal(fusion.fuse_labels(candidates, weights), [1, 2, 4, 9])


def test_majority_of_three_outvotes_one_dissenter():
    candidates = np.array([[7, 7, 9, 2], [7, 8, 9, 3], [6, 7, 8, 3]])
    fused = fusion.fuse_labels(candidates)
    assert fused.dtype == np.int32
    np.testing.assert_array_equal(fused, [7, 7, 9, 3])


def test_a_single_atlas_gives_its_labels_exactly():
    labels = np.random.default_rng(0).integers(-300, 3000, size=(1, 5000))
    np.testing.assert_array_equal(fusion.fuse_labels(labels), labels[0])
    weights = np.random.default_rng(1).uniform(-1, 1, size=labels.shape).astype(np.float32)
    np.testing.assert_array_equal(fusion.fuse_labels(labels, weights), labels[0])


def test_weights_change_the_winner_where_they_outweigh_the_majority():
    candidates = np.array([[5, 5], [6, 6], [6, 6]])
    weights = np.array([[0.6, 0.3], [0.2, 0.35], [0.2, 0.35]], np.float32)
    np.testing.assert_array_equal(fusion.fuse_labels(candidates), [6, 6])
    np.testing.assert_array_equal(fusion.fuse_labels(candidates, weights), [5, 6])


def test_ties_go_to_the_label_of_the_first_atlas():
    np.testing.assert_array_equal(fusion.fuse_labels([[3], [4]]), [3])
    np.testing.assert_array_equal(fusion.fuse_labels([[4], [3]]), [4])
    np.testing.assert_array_equal(fusion.fuse_labels([[1, 2], [2, 1], [2, 1], [1, 2]]), [1, 2])
    halves = np.full((2, 1), 0.5, np.float32)
    np.testing.assert_array_equal(fusion.fuse_labels([[8], [2]], halves), [8])


def test_negative_weights_count_against_their_label():
    candidates = np.array([[10], [20], [10]])
    weights = np.array([[-0.2], [0.6], [0.6]], np.float32)  # 10: 0.4, 20: 0.6
    np.testing.assert_array_equal(fusion.fuse_labels(candidates, weights), [20])
    assert fusion.label_probability(candidates, weights, 10)[0] == pytest.approx(0.4)


def test_arbitrary_label_ids():
    ids = np.array([-7, 0, 256, 1000, 2 ** 31 - 1, inference.MIXED_CELL], np.int64)
    rng = np.random.default_rng(2)
    candidates = rng.choice(ids, size=(4, 3000))
    weights = rng.random((4, 3000)).astype(np.float32)
    np.testing.assert_array_equal(fusion.fuse_labels(candidates, weights),
                                  reference_vote(candidates, weights))
    np.testing.assert_array_equal(fusion.fuse_labels(candidates), reference_vote(candidates))


@pytest.mark.parametrize("weighted", [False, True])
def test_chunks_give_the_result_of_one_chunk(weighted):
    rng = np.random.default_rng(3)
    candidates = rng.integers(0, 4, size=(5, 2001))
    weights = rng.random(candidates.shape).astype(np.float32) if weighted else None
    whole = fusion.fuse_labels(candidates, weights)
    np.testing.assert_array_equal(fusion.fuse_labels(candidates, weights, points_per_chunk=7),
                                  whole)
    np.testing.assert_array_equal(whole, reference_vote(candidates, weights))
    np.testing.assert_array_equal(fusion.label_probability(candidates, weights, 2, 13),
                                  fusion.label_probability(candidates, weights, 2))


def test_label_probabilities_are_weight_fractions_and_sum_to_one():
    candidates = np.array([[1, 1], [2, 1], [1, 3]])
    weights = np.array([[0.5, 1.0], [0.25, 1.0], [0.25, 2.0]], np.float32)
    np.testing.assert_allclose(fusion.label_probability(candidates, weights, 1), [0.75, 0.5])
    np.testing.assert_allclose(fusion.label_probability(candidates, None, 1), [2 / 3, 2 / 3])
    total = sum(fusion.label_probability(candidates, weights, label) for label in (1, 2, 3))
    np.testing.assert_allclose(total, 1.0)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="candidates"):
        fusion.fuse_labels(np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="weights"):
        fusion.fuse_labels(np.zeros((2, 5), np.int32), np.ones((3, 5)))
    with pytest.raises(ValueError, match="int32"):
        fusion.fuse_labels(np.array([[1], [2 ** 40]]))
    with pytest.raises(ValueError, match="points"):
        fusion.fuse_at_points(np.zeros((2, 5), np.int32), np.ones((2, 4, 4, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="points"):
        fusion.fuse_at_points(np.zeros((2, 5), np.int32), np.ones((2, 4, 4, 4)))


# ------------------------------------------------------------------------- weights at points
def test_fuse_at_points_reads_the_weight_maps_where_the_atlases_disagree():
    rng = np.random.default_rng(4)
    points = rng.uniform(0, 15, size=(4000, 3)).astype(np.float32)
    candidates = np.stack([np.full(4000, 11), np.full(4000, 22), np.full(4000, 22)])
    candidates[:, :100] = 33  # all agree there
    maps = np.full((3, 16, 16, 16), 0.25, np.float32)
    maps[0, :, :, :8] = 0.9  # atlas 0 outweighs the other two where x < 8
    fused = fusion.fuse_at_points(candidates, maps, points)
    np.testing.assert_array_equal(fused[:100], 33)
    # Atlas 0 weighs 0.9 up to x = 7, 0.25 from x = 8, linearly between: > 0.5 for x < 7 + 0.4/0.65.
    x = points[100:, 2]
    assert np.all(fused[100:][x < 7.61] == 11) and np.all(fused[100:][x > 7.62] == 22)
    weights = fusion.weights_at_points(maps, points)
    assert weights.shape == (3, 4000)
    np.testing.assert_array_equal(fused, fusion.fuse_labels(candidates, weights))
    np.testing.assert_array_equal(fusion.fuse_at_points(candidates, maps, points, 37), fused)
    np.testing.assert_array_equal(fusion.fuse_at_points(candidates), [33] * 100 + [22] * 3900)


# --------------------------------------------------------------------- locally weighted voting
def half_matching_atlases(rng):
    """A scan and two atlases: atlas 0 is the scan where x < W/2 and unrelated elsewhere, atlas 1
    the other way round."""
    scan = smooth_field(rng)
    other = [smooth_field(rng), smooth_field(rng)]
    left = np.zeros(SHAPE, bool)
    left[..., :SHAPE[2] // 2] = True
    atlases = np.stack([np.where(left, scan, other[0]), np.where(left, other[1], scan)])
    return scan, atlases


@pytest.mark.parametrize("method", ["lwv", "jlf"])
def test_weights_favour_the_atlas_that_matches_the_scan_locally(method):
    scan, atlases = half_matching_atlases(np.random.default_rng(5))
    weights = (fusion.locally_weighted_voting_weights(scan, atlases) if method == "lwv"
               else fusion.joint_label_fusion_weights(scan, atlases))
    assert weights.shape == (2, *SHAPE) and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, atol=1e-5)
    half = SHAPE[2] // 2  # 5 voxels from the border between the halves, out of its reach
    for matching in (weights[0, ..., :half - 5], weights[1, ..., half + 5:]):
        assert matching.min() > 0.5 and matching.mean() > 0.85


def test_lwv_gain_zero_is_a_majority_vote_and_shapes_are_checked():
    scan, atlases = half_matching_atlases(np.random.default_rng(6))
    np.testing.assert_allclose(fusion.locally_weighted_voting_weights(scan, atlases, gain=0), 0.5)
    with pytest.raises(ValueError, match="warped_atlases"):
        fusion.locally_weighted_voting_weights(scan, atlases[:, :-1])
    with pytest.raises(ValueError, match="window"):
        fusion.locally_weighted_voting_weights(scan, atlases, window=4)


# ------------------------------------------------------------------------- joint label fusion
@pytest.mark.parametrize("copies", [2, 3])
def test_identical_atlases_get_equal_weights(copies):
    rng = np.random.default_rng(7)
    scan = smooth_field(rng)
    atlas = scan + smooth_field(rng, 1.0)
    weights = fusion.joint_label_fusion_weights(scan, np.stack([atlas] * copies))
    np.testing.assert_allclose(weights, 1.0 / copies, atol=1e-5)


def test_a_duplicated_atlas_does_not_double_its_influence():
    """Atlases 0 and 1 are one atlas twice, atlas 2 an independent one as far from the scan:
    joint label fusion gives the two copies together about one atlas's weight, locally weighted
    voting gives them two."""
    rng = np.random.default_rng(8)
    scan = smooth_field(rng)
    copy, independent = scan + smooth_field(rng, 1.0), scan + smooth_field(rng, 1.0)
    atlases = np.stack([copy, copy, independent])
    inner = (slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    joint = fusion.joint_label_fusion_weights(scan, atlases)
    np.testing.assert_allclose(joint[0], joint[1], atol=1e-6)
    np.testing.assert_allclose(joint.sum(axis=0), 1.0, atol=1e-5)
    joint = joint[inner].mean(axis=(1, 2, 3))
    local = fusion.locally_weighted_voting_weights(scan, atlases)[inner].mean(axis=(1, 2, 3))
    assert 0.75 < (joint[0] + joint[1]) / joint[2] < 1.4
    assert (local[0] + local[1]) / local[2] > 1.6


def test_negative_weights_are_kept_or_clipped_and_always_sum_to_one():
    """An atlas with three times another's error, in the same places: the paper's weights
    subtract it (negative), ANTs' clip it to 0."""
    rng = np.random.default_rng(9)
    scan = smooth_field(rng)
    error = 0.5 * smooth_field(rng, 1.0)
    atlases = np.stack([scan + error, scan + 3 * error])
    kept = fusion.joint_label_fusion_weights(scan, atlases, clip_negative=False,
                                             vote_over_patch=False)
    clipped = fusion.joint_label_fusion_weights(scan, atlases, vote_over_patch=False)
    assert kept.min() < -0.1 and clipped.min() >= 0.0
    for weights in (kept, clipped):
        np.testing.assert_allclose(weights.sum(axis=0), 1.0, atol=1e-5)


def brute_force_joint_weights(scan, atlases, radius, alpha=0.1, beta=2.0):
    """The module's definition, voxel by voxel: each voxel standardised by the patch (inside the
    grid) centred on it, M from the patch around x, w = (M + αI)^-1 1, normalised."""
    shape = scan.shape

    def patch(image, centre):
        return image[tuple(slice(max(0, c - radius), c + radius + 1) for c in centre)]

    def standardised(image, voxel):
        values = patch(image, voxel)
        return (image[voxel] - values.mean()) / max(values.std(ddof=1), 0.01 * np.ptp(scan))

    weights = np.zeros((len(atlases), *shape))
    for centre in itertools.product(*map(range, shape)):
        voxels = list(itertools.product(*[range(max(0, c - radius), min(s, c + radius + 1))
                                          for c, s in zip(centre, shape)]))
        errors = np.array([[abs(standardised(atlas, v) - standardised(scan, v)) for v in voxels]
                           for atlas in atlases])
        matrix = (errors @ errors.T / (len(voxels) - 1)) ** beta + alpha * np.eye(len(atlases))
        solution = np.linalg.solve(matrix, np.ones(len(atlases)))
        weights[(slice(None), *centre)] = solution / solution.sum()
    return weights


def test_joint_weights_match_a_voxel_by_voxel_computation_in_slabs(monkeypatch):
    rng = np.random.default_rng(10)
    shape = (5, 6, 7)
    scan = rng.random(shape).astype(np.float32)
    atlases = rng.random((3, *shape)).astype(np.float32)
    monkeypatch.setattr(fusion, "ERRORS_PER_SLAB", 10)  # slabs of one slice, margins of 2
    raw = fusion.joint_label_fusion_weights(scan, atlases, patch_radius=1, clip_negative=False,
                                            vote_over_patch=False)
    np.testing.assert_allclose(raw, brute_force_joint_weights(scan, atlases, 1), atol=2e-5)
    voted = fusion.joint_label_fusion_weights(scan, atlases, patch_radius=1, clip_negative=False)
    expected = np.stack([ndimage.uniform_filter(w, 3, mode="constant")
                         / ndimage.uniform_filter(np.ones(shape), 3, mode="constant")
                         for w in raw.astype(np.float64)])
    np.testing.assert_allclose(voted, expected, atol=2e-5)


def test_mask_limits_where_weights_are_solved():
    scan, atlases = half_matching_atlases(np.random.default_rng(11))
    mask = np.zeros(SHAPE, bool)
    mask[4:12, 5:15, 6:18] = True
    full = fusion.joint_label_fusion_weights(scan, atlases, vote_over_patch=False)
    masked = fusion.joint_label_fusion_weights(scan, atlases, vote_over_patch=False, mask=mask)
    np.testing.assert_allclose(masked[:, mask], full[:, mask], atol=1e-6)
    np.testing.assert_array_equal(masked[:, ~mask], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        fusion.joint_label_fusion_weights(scan, atlases, alpha=0.0)
    with pytest.raises(ValueError, match="mask"):
        fusion.joint_label_fusion_weights(scan, atlases, mask=mask[:-1])
