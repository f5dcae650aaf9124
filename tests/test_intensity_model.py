"""The per-scan intensity model (``ltnet_tf.labelling``): boundaries move to the scan's intensity
edges, and only there; flat or unusable intensities keep the transfer's labels with the reason;
the same inputs give the same bits. Tiny phantoms, no TensorFlow model."""
import numpy as np
import pytest

from ltnet_tf.config import ConfigError
from ltnet_tf.labelling.intensity_model import IntensityModel, IntensityModelSettings
from ltnet_tf.labelling.prior import TransferPrior

SHAPE = (24, 20, 16)
EDGE = 10           # the scan's true boundary along the first axis
TRANSFER_EDGE = 12  # where the label transfer put it: two voxels off


def two_halves(edge, low=1, high=2):
    labels = np.full(SHAPE, low, np.int32)
    labels[edge:] = high
    return labels


def noisy_scan(seed=0, contrast=0.4):
    """Intensity 0.3 below EDGE, 0.3 + contrast from it on, plus noise."""
    values = np.where(np.arange(SHAPE[0])[:, None, None] < EDGE, 0.3, 0.3 + contrast)
    values = np.broadcast_to(values, SHAPE).astype(np.float32)
    return values + np.random.default_rng(seed).normal(0, 0.03, SHAPE).astype(np.float32)


def test_the_boundary_moves_to_the_intensity_edge():
    """The transfer put the boundary two voxels off the scan's edge: the model moves it onto the
    edge, everywhere, and changes nothing farther than the prior reaches."""
    transfer = two_halves(TRANSFER_EDGE)
    result = IntensityModel()(noisy_scan(), None, transfer, (1.0, 1.0, 1.0))
    assert result.record["applied"] and result.record["warning"] is None
    # the first row past the edge is 2 voxels from the transfer's boundary, where the prior is
    # 0.93 : 0.07 and a few noisy voxels keep the transfer's label; every other voxel is right
    assert np.mean(result.labels[EDGE] == 2) > 0.95
    rest = np.ones(SHAPE[0], bool)
    rest[EDGE] = False
    np.testing.assert_array_equal(result.labels[rest], two_halves(EDGE)[rest])
    means = result.record["gaussians"]
    assert means[1][0] == pytest.approx(0.3, abs=0.01) and means[2][0] == pytest.approx(0.7,
                                                                                        abs=0.01)


def test_the_prior_limits_how_far_a_boundary_moves():
    """An edge farther from the transfer's boundary than the prior's reach cannot pull it: a
    voxel's candidates are the labels whose smoothed prior exceeds the floor there."""
    transfer = two_halves(EDGE + 6)
    result = IntensityModel()(noisy_scan(), None, transfer, (1.0, 1.0, 1.0))
    moved = np.flatnonzero(np.any(result.labels != transfer, axis=(1, 2)))
    assert moved.size and moved.min() >= EDGE + 6 - 3, moved  # sigma 1 mm, floor 0.01


def test_smoothing_is_in_mm():
    """On voxels 4 mm thick along the first axis, the prior reaches less than one voxel across:
    the two-voxel error along that axis stays (the model does not invent sub-slice edges)."""
    transfer = two_halves(TRANSFER_EDGE)
    result = IntensityModel()(noisy_scan(), None, transfer, (4.0, 1.0, 1.0))
    np.testing.assert_array_equal(result.labels, transfer)


def test_a_flat_scan_keeps_the_transfers_labels():
    transfer = two_halves(TRANSFER_EDGE)
    result = IntensityModel()(np.full(SHAPE, 0.5, np.float32), None, transfer, (1.0, 1.0, 1.0),
                              probabilities=[2])
    np.testing.assert_array_equal(result.labels, transfer)
    assert not result.record["applied"] and "flat" in result.record["warning"]
    np.testing.assert_array_equal(result.probabilities[0], 255 * (transfer == 2))


def test_a_collapsing_structure_keeps_the_transfers_labels():
    """A one-voxel sheet of label 3 with its neighbours' intensities: the smoothed prior makes it
    lose to them everywhere, which is named, and the transfer's labels are kept."""
    transfer = two_halves(TRANSFER_EDGE)
    transfer[:, :, 8] = 3
    result = IntensityModel()(noisy_scan(contrast=0.0), None, transfer, (1.0, 1.0, 1.0))
    assert not result.record["applied"] and "collapsed" in result.record["warning"]
    assert "3" in result.record["warning"]
    np.testing.assert_array_equal(result.labels, transfer)


def test_a_small_collapsing_structure_gets_its_transferred_labels_back():
    """A small structure (2 % of the brain) the intensities do not support (a one-voxel sheet in
    its neighbour's tissue: the smoothed prior favours the neighbour on both sides) is named and
    keeps its transferred labels; the rest of the scan is still finished by the model."""
    transfer = two_halves(TRANSFER_EDGE)
    transfer[18, 2:18, 4:12] = 4  # 128 voxels with label 2's intensities
    result = IntensityModel()(noisy_scan(), None, transfer, (1.0, 1.0, 1.0))
    assert result.record["applied"] and "4 (128 -> " in result.record["warning"]
    np.testing.assert_array_equal(result.labels[transfer == 4], 4)
    assert np.mean(result.labels[EDGE:TRANSFER_EDGE] == 2) > 0.95  # the edge still moved


def test_the_same_inputs_give_the_same_bits():
    transfer = two_halves(TRANSFER_EDGE)
    scan = noisy_scan(seed=3)
    first = IntensityModel()(scan, scan > 0.5, transfer, (1.0, 1.0, 1.0), probabilities=[1, 2])
    second = IntensityModel()(scan.copy(), scan > 0.5, transfer.copy(), (1.0, 1.0, 1.0),
                              probabilities=[1, 2])
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.probabilities, second.probabilities)
    assert first.record == second.record


def test_only_voxels_of_the_mask_change():
    transfer = two_halves(TRANSFER_EDGE)
    mask = np.zeros(SHAPE, bool)
    mask[:, :10] = True
    result = IntensityModel()(noisy_scan(), mask, transfer, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(result.labels[~mask], transfer[~mask])
    moved = (result.labels == two_halves(EDGE))[mask[0:1].repeat(SHAPE[0], 0)].reshape(
        SHAPE[0], -1)
    assert moved.all(1)[EDGE + 1:].all() and moved.all(1)[:EDGE].all()
    assert moved[EDGE].mean() > 0.95


def test_posterior_probabilities_follow_the_labels():
    transfer = two_halves(TRANSFER_EDGE)
    result = IntensityModel()(noisy_scan(), None, transfer, (1.0, 1.0, 1.0), probabilities=[1, 2])
    one, two = result.probabilities.astype(int)
    assert np.all(one + two <= 256) and np.all(one + two >= 254)  # rounding of two shares
    np.testing.assert_array_equal(two > 127, result.labels == 2)


def test_several_atlases_votes_make_the_prior_uncertain():
    """Where two equally weighted atlases disagree (one puts the boundary at the edge, one two
    voxels off), the prior is split and the intensities decide; where they agree it is certain."""
    fused = two_halves(EDGE)
    other = two_halves(TRANSFER_EDGE)
    flat_index = np.arange(fused.size)
    votes = (flat_index, np.stack([fused.ravel(), other.ravel()]), None)
    prior = TransferPrior.build(fused, np.ones(SHAPE, bool), (1.0, 1.0, 1.0), sigma_mm=1.0,
                                truncate=2.5, floor=0.01, slots=4, votes=votes)
    rows = np.unravel_index(prior.uncertain_voxels, SHAPE)[0]
    # a prior above the floor (0.01) reaches two voxels past where the atlases disagree
    assert set(np.unique(rows)) == set(range(EDGE - 2, TRANSFER_EDGE + 2))
    split = prior.slot_prior[(rows == EDGE) | (rows == EDGE + 1)][:, :2]
    assert np.all((split > 0.3) & (split < 0.7)), split  # the atlases' 50:50, smoothed
    result = IntensityModel()(noisy_scan(), None, fused, (1.0, 1.0, 1.0), votes=votes)
    np.testing.assert_array_equal(result.labels, two_halves(EDGE))


def test_bad_settings_are_refused():
    for change in ({"prior_weight": 0}, {"iterations": 0}, {"prior_sigma_mm": float("nan")},
                   {"variance_anchor": -1.0}, {"slots": 1.5}):
        with pytest.raises(ConfigError):
            IntensityModelSettings().replace(**change)


# ------------------------------------------------------------------------------ in predict.py
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """The demo's synthetic atlas and two scans (other anatomies, other contrasts), 48x56x64: the
    model's prior is smoothed in mm, and on smaller phantoms structures are a few mm thick."""
    from ltnet_tf.commands import synthetic

    return synthetic.make_demo_dataset(str(tmp_path_factory.mktemp("phantom")), n_scans=2,
                                       seed=3)


def test_off_gives_the_label_transfers_labels_and_auto_finishes_them(phantom):
    """--intensity_model off: the labels are exactly the atlas labels pulled through the refined
    displacement; auto: the same registration, then the model (recorded, timed), better on the
    phantoms on average, and the same bits again on a second call."""
    from ltnet_tf.config import RefinementSettings
    from ltnet_tf.io import evaluation, volumes as data
    from ltnet_tf.prediction.predictor import Predictor
    from ltnet_tf.registration.atlases import AtlasSet
    from ltnet_tf.registration.native import brain_mask

    atlases = AtlasSet.load([phantom["atlas"]], [phantom["atlas_labels"]])
    off = Predictor(atlases, None, refinement=RefinementSettings(), intensity_model="off")
    auto = Predictor(atlases, None, refinement=RefinementSettings())
    gains = []
    for image, labels in zip(phantom["images"], phantom["labels"]):
        scan, reference = data.load_scan(image), data.load_label_map(labels).data
        plain, finished = off.segment(scan), auto.segment(scan)
        pulled = off.pulls[0](plain["displacement"].element(0), np.eye(4), scan.shape,
                              grid_shape=off.atlas.shape, mask=brain_mask(scan.data))
        np.testing.assert_array_equal(plain["segmentation"], pulled)
        assert plain["intensity_model"] is None and "intensity_model" not in plain["seconds"]
        assert finished["intensity_model"]["applied"] and "intensity_model" in finished["seconds"]
        ids = [i for i in np.unique(reference) if i != 0]
        gains.append(np.subtract(*(evaluation.mean_dice(evaluation.dice_per_label(
            result["segmentation"], reference, ids), ids) for result in (finished, plain))))
    np.testing.assert_array_equal(auto.segment(scan)["segmentation"], finished["segmentation"])
    assert np.mean(gains) > 0.005, gains
    with pytest.raises(ConfigError, match="intensity_model"):
        Predictor(atlases, None, refinement=RefinementSettings(), intensity_model="on")


def test_several_atlases_give_the_model_their_votes(phantom):
    """With two atlases the prior is their JLF-weighted votes: the model is applied on the fused
    labels, and where the two atlases agree and nothing else is near, the fused label stays."""
    from ltnet_tf.config import RefinementSettings
    from ltnet_tf.io import volumes as data
    from ltnet_tf.prediction.predictor import Predictor
    from ltnet_tf.registration.atlases import AtlasSet

    atlases = AtlasSet.load([phantom["atlas"], phantom["images"][1]],
                            [phantom["atlas_labels"], phantom["labels"][1]])
    scan = data.load_scan(phantom["images"][0])
    off = Predictor(atlases, None, refinement=RefinementSettings(), intensity_model="off")
    auto = Predictor(atlases, None, refinement=RefinementSettings())
    fused, finished = off.segment(scan), auto.segment(scan)
    record = finished["intensity_model"]
    assert record["applied"] and 0 < record["changed_fraction"] < 0.2
    changed = fused["segmentation"] != finished["segmentation"]
    assert changed.any()
    assert np.array_equal(auto.segment(scan)["segmentation"], finished["segmentation"])
