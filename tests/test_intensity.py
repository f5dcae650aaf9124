"""Robust intensity normalisation (ltnet_tf.io.intensity): a numpy reference, the outlier phantom, the
background, and the paths that use it (training input, LabelTransfer, refinement, SavedModel)."""
import numpy as np
import pytest
from scipy import ndimage

from ltnet_tf.commands import synthetic
from ltnet_tf.config import LTNetConfig, RefinementSettings
from ltnet_tf.io import intensity, volumes as data
from ltnet_tf.registration.networks import ForwardGenerator
from ltnet_tf.registration.refinement import Refinement, ScanRefiner
from ltnet_tf.registration.transfer import LabelTransfer
from ltnet_tf.serving.export import ServingModule

import tensorflow as tf  # noqa: E402  (after ltnet_tf, which selects Keras 2)

SHAPE = (24, 28, 32)


def numpy_normalize(volume, percentiles=intensity.INTENSITY_PERCENTILES):
    """The method in plain numpy, written from the module docstring (also docs/serving.md)."""
    volume = np.asarray(volume, np.float32)
    flat = volume.ravel()
    sample = flat[::-(-flat.size // intensity.MAX_SAMPLES)]
    values, counts = np.unique(sample, return_counts=True)
    background = values[counts.argmax()] if counts.max() >= 0.1 * sample.size else None
    tissue = sample if background is None else sample[sample != background]
    if tissue.size == 0:
        return np.zeros_like(volume)
    q1, q3 = np.percentile(tissue, [25, 75])
    if q3 > q1:
        tissue = tissue[(tissue >= q1 - 3 * (q3 - q1)) & (tissue <= q3 + 3 * (q3 - q1))]
    low, high = np.percentile(tissue, percentiles)
    if high <= low and background is not None:  # tissue of one value
        low = background
    scaled = (volume - low) / (high - low) if high != low else np.zeros_like(volume)
    normalized = np.where(scaled > 4.0, 0.0, np.clip(scaled, 0.0, 1.0))
    if background is not None:
        normalized[volume == background] = 0.0
    return normalized.astype(np.float32)


def brain(shape=SHAPE, seed=0, scale=968):
    """A skull-stripped synthetic brain (blurred, noisy) stored as int16 0..``scale``, and its mask."""
    rng = np.random.default_rng(seed)
    tissues = synthetic.phantom_tissues(shape)
    inside = synthetic.TISSUE_LABEL_IDS[tissues] > 0
    image = ndimage.gaussian_filter(synthetic.TISSUE_INTENSITIES[tissues] * inside, 0.6)
    image = np.where(inside, np.clip(image + rng.normal(0, 0.02, shape), 0.01, None), 0)
    return np.round(image * scale / image.max()).astype(np.int16), inside


def with_outliers(scan, inside, n=24, seed=1):
    """A few dozen background voxels at +-32,000, as int16 wrap-around or a converter leaves."""
    rng = np.random.default_rng(seed)
    dirty = scan.copy()
    picked = rng.choice(np.flatnonzero(~inside.ravel()), n, replace=False)
    dirty.ravel()[picked] = np.where(np.arange(n) % 2, 32000, -32000)
    return dirty


def min_max(scan):
    """The normalisation this replaces, as the control that shows the outliers' effect."""
    scan = tf.cast(scan, tf.float32)
    low = tf.reduce_min(scan, axis=[1, 2, 3, 4], keepdims=True)
    high = tf.reduce_max(scan, axis=[1, 2, 3, 4], keepdims=True)
    return tf.math.divide_no_nan(scan - low, high - low)


# ------------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize("case", ["mri", "ct", "offset", "noise", "int16", "strided"])
def test_equals_the_numpy_reference(case):
    rng = np.random.default_rng(4)
    scan, inside = brain()
    volume = {"mri": scan.astype(np.float32),
              "ct": np.where(inside, scan, -1024).astype(np.float32),
              "offset": scan.astype(np.float32) + 100.0,
              "noise": rng.normal(10, 3, SHAPE).astype(np.float32),
              "int16": scan,
              # 66³ > MAX_SAMPLES voxels: every 2nd voxel is sampled
              "strided": brain((66, 66, 66))[0].astype(np.float32)}[case]
    got = intensity.normalize_array(volume)
    assert got.dtype == np.float32 and got.shape == volume.shape
    np.testing.assert_allclose(got, numpy_normalize(volume), rtol=0, atol=1e-6)
    assert got.min() >= 0.0 and got.max() == 1.0


def test_outliers_do_not_change_the_normalised_brain():
    clean, inside = brain()
    dirty = with_outliers(clean, inside)
    robust_clean, robust_dirty = intensity.normalize_array(clean), intensity.normalize_array(dirty)
    assert np.abs(robust_dirty - robust_clean)[inside].max() <= 1e-3
    np.testing.assert_array_equal(robust_dirty[~inside], 0.0)  # +32,000 too: an artefact
    squeezed = min_max(dirty[None, ..., None]).numpy()[0, ..., 0][inside]
    assert squeezed.max() - squeezed.min() < 0.02  # what min-max made of it: 0.50-0.52


def test_background_is_exactly_zero_whatever_its_value():
    clean, inside = brain()
    reference = intensity.normalize_array(clean)
    for background in (0.0, -1024.0, 100.0):
        volume = np.where(inside, clean + (background if background > 0 else 0), background)
        normalized = intensity.normalize_array(volume.astype(np.float32))
        np.testing.assert_array_equal(normalized[~inside], 0.0)
        np.testing.assert_allclose(normalized[inside], reference[inside], atol=1e-6)
    # A brain with negative values (z-scored) keeps its zero background at 0, not mid-grey.
    z_scored = np.where(inside, (clean - clean[inside].mean()) / clean[inside].std(), 0.0)
    normalized = intensity.normalize_array(z_scored.astype(np.float32))
    np.testing.assert_array_equal(normalized[~inside], 0.0)
    assert normalized[inside].mean() > 0.3


def test_a_scan_without_flat_background_uses_all_voxels():
    noise = np.random.default_rng(0).normal(0, 1, SHAPE).astype(np.float32)
    low, high, _, has_background = (v.numpy()[0] for v in intensity.intensity_window(
        tf.constant(noise[None, ..., None])))
    assert not has_background
    np.testing.assert_allclose([low, high], np.percentile(noise, [0.5, 99.5]), rtol=1e-5)


def test_a_mask_given_as_a_scan_keeps_its_contrast():
    mask = np.zeros(SHAPE, np.float32)
    mask[8:16, 8:20, 8:24] = 5.0
    for background in (0.0, 9.0):  # a bright background too: still 0, the mask 1
        volume = np.where(mask > 0, mask, background).astype(np.float32)
        np.testing.assert_array_equal(intensity.normalize_array(volume), mask / 5.0)
        np.testing.assert_array_equal(numpy_normalize(volume), mask / 5.0)


def test_constant_and_empty_scans_give_zeros_not_nan():
    batch = np.stack([np.zeros(SHAPE), np.full(SHAPE, 3.0), np.full(SHAPE, -7.0)])[..., None]
    normalized = data.normalize_intensity(tf.constant(batch, tf.float32)).numpy()
    assert not np.isnan(normalized).any()
    np.testing.assert_array_equal(normalized, 0.0)


def test_each_scan_of_a_batch_on_its_own_and_batch_size_free():
    clean, inside = brain()
    scans = np.stack([clean, with_outliers(clean, inside), clean * 3 - 500]).astype(np.float32)
    function = tf.function(data.normalize_intensity, input_signature=[
        tf.TensorSpec([None, *SHAPE, 1], tf.float32)])  # as in the SavedModel signatures
    together = function(tf.constant(scans[..., None])).numpy()[..., 0]
    for scan, normalized in zip(scans, together):
        np.testing.assert_array_equal(normalized, intensity.normalize_array(scan))


# ------------------------------------------------------------------------------- the paths
def deformed_pair(seed=1):
    """The atlas (the phantom, float) with its labels, and a deformed brain as int16 0..968."""
    tissues = synthetic.phantom_tissues(SHAPE)
    labels = synthetic.TISSUE_LABEL_IDS[tissues]
    atlas = (synthetic.TISSUE_INTENSITIES[tissues] * (labels > 0)).astype(np.float32)
    displacement = synthetic.random_displacement(np.random.default_rng(seed), SHAPE, 2.0, 4.0)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in SHAPE], indexing="ij")
    points = [g + d for g, d in zip(grid, displacement)]
    inside = ndimage.map_coordinates((labels > 0).astype(np.float32), points, order=1) > 0.5
    moved = ndimage.map_coordinates(atlas * 1.1, points, order=1)
    scan = np.where(inside, np.round(moved * 968 / moved.max()), 0).astype(np.int16)
    return atlas, labels, scan, inside


def mean_dice(a, b, labels):
    ids = [i for i in np.unique(labels) if i]
    return np.mean([2 * np.sum((a == i) & (b == i)) / max(np.sum(a == i) + np.sum(b == i), 1)
                    for i in ids])


@pytest.fixture(scope="module")
def transfer_setup():
    """A random-init G_F whose flow layer is scaled up, so that its displacement (up to ~2 voxels)
    depends on the scan's intensities as a trained one's does."""
    atlas, labels, scan, inside = deformed_pair()
    config = LTNetConfig().replace(atlas_shape=list(SHAPE), downsample=2, enc_features=[8, 8],
                                   dec_features=[8, 8, 8, 8],
                                   label_ids=sorted(set(labels.ravel().tolist())))
    tf.keras.utils.set_random_seed(0)
    generator = ForwardGenerator.from_ltnet_config(config)
    flow_layer = next(layer for layer in generator.layers if layer.name.endswith("flow"))
    kernel, bias = flow_layer.get_weights()
    flow_layer.set_weights([np.random.default_rng(3).normal(0, 0.02, kernel.shape)
                            .astype(np.float32), bias])
    return config, generator, atlas, labels, scan, with_outliers(scan, inside)


def segmentations(label_transfer, scans, refine):
    results = []
    for scan in scans:
        refinement = (Refinement.for_label_transfer(label_transfer, steps=10, coarse_steps=10)
                      if refine else None)
        results.append(label_transfer.segment(tf.constant(scan[None, ..., None], tf.float32),
                                              refinement=refinement)["segmentation"][0].numpy())
    return results


@pytest.mark.slow  # test-time refinement on every scan (CI runs -m slow too)
@pytest.mark.parametrize("refine", [False, True])
def test_label_transfer_segments_the_outlier_scan_as_the_clean_one(transfer_setup, refine,
                                                                   monkeypatch):
    config, generator, atlas, labels, clean, dirty = transfer_setup
    label_transfer = LabelTransfer(generator, config, atlas, labels)
    clean_seg, dirty_seg = segmentations(label_transfer, (clean, dirty), refine)
    assert mean_dice(clean_seg, dirty_seg, labels) >= 0.995
    # The control: with min-max normalisation the same outliers change the segmentation.
    monkeypatch.setattr(data, "normalize_intensity", min_max)
    old = LabelTransfer(generator, config, atlas, labels)
    old_clean, old_dirty = segmentations(old, (clean, dirty), refine)
    assert mean_dice(old_clean, old_dirty, labels) < 0.98


@pytest.mark.slow  # exports and reloads a SavedModel (CI runs -m slow too)
def test_scan_refiner_and_saved_model_use_it(transfer_setup, tmp_path):
    config, generator, atlas, labels, clean, dirty = transfer_setup
    label_transfer = LabelTransfer(generator, config, atlas, labels)
    module = ServingModule(label_transfer, Refinement.for_label_transfer(label_transfer))
    tf.saved_model.save(module, str(tmp_path / "1"), signatures=module.signatures())
    served = tf.saved_model.load(str(tmp_path / "1")).signatures
    outputs = {}
    for name, scan in (("clean", clean), ("dirty", dirty)):
        batch = tf.constant(scan[None, ..., None], tf.float32)
        outputs[name] = (served["segment"](scan=batch)["segmentation"][0].numpy(),
                         served["segment_refined"](scan=batch, steps=tf.constant(5),
                                                   coarse_steps=tf.constant(5))
                         ["segmentation"][0].numpy())
    assert mean_dice(outputs["clean"][0], outputs["dirty"][0], labels) >= 0.995
    assert mean_dice(outputs["clean"][1], outputs["dirty"][1], labels) >= 0.995
    # predict.py's refiner (numpy in, numpy out) normalises the same way.
    refiner = ScanRefiner(config, atlas, RefinementSettings(steps=5, coarse_steps=5))
    flow_working = label_transfer.displacement(tf.constant(clean[None, ..., None], tf.float32))
    flows = [refiner(data.Volume(scan.astype(np.float32), np.eye(4), name),
                     flow_working["flow_working"][0].numpy())[0].full_grid(atlas.shape).numpy()
             for name, scan in (("clean", clean), ("dirty", dirty))]
    np.testing.assert_allclose(flows[0], flows[1], atol=1e-5)
