"""MIND-SSC (ltnet_tf.registration.mind): descriptors that ignore the contrast, a shift between a
T1-like and a T2-like phantom recovered, and descriptors made once per image (tiny volumes)."""
import numpy as np
import pytest

from ltnet_tf.commands import synthetic
from ltnet_tf.config import RefinementSettings
from ltnet_tf.registration import mind
from ltnet_tf.registration.refinement import Refinement

import tensorflow as tf  # noqa: E402  (after ltnet_tf, which selects Keras 2)

SHAPE = (24, 28, 32)


def t1_phantom(shape=SHAPE, margin: int = 0) -> np.ndarray:
    """The demo anatomy in T1-like intensities with a mild smooth texture, ``margin`` voxels
    larger on every side (to cut shifted copies from)."""
    big = [s + 2 * margin for s in shape]
    tissues = synthetic.phantom_tissues(big)
    texture = np.random.default_rng(0).normal(size=big)
    from scipy import ndimage
    texture = ndimage.gaussian_filter(texture, 1.5)
    values = synthetic.TISSUE_INTENSITIES[tissues] * (1 + 0.04 * texture / texture.std())
    return np.where(tissues > 0, values, 0.0).astype(np.float32)


def t2_like(t1: np.ndarray) -> np.ndarray:
    """A decreasing, non-linear map inside the head (CSF brightest), 0 outside."""
    inside = t1 > 0
    return np.where(inside, 1.0 - 0.9 * np.sqrt(t1 / t1.max()), 0.0).astype(np.float32)


def describe(volume) -> np.ndarray:
    return mind.mind_ssc(tf.constant(volume[None]))[0].numpy()


def test_descriptors_of_an_image_and_of_its_inverted_copy_agree():
    from scipy import ndimage

    t1 = t1_phantom()
    np.testing.assert_allclose(describe(2.0 - t1), describe(t1), atol=1e-5)
    # Inverted inside the head only (the background stays 0, so the head's outline changes),
    # and mapped by a non-linear decreasing function: inside the head, the descriptors differ by
    # far less than those of the T1 moved by two voxels.
    head = t1 > 0
    inner = ndimage.binary_erosion(head, iterations=3)

    def change(volume):
        return float(np.abs(describe(volume) - describe(t1))[inner].mean())

    moved = change(np.roll(t1, 2, axis=2))
    inverted = change(np.where(head, 1.0 - 0.9 * t1 / t1.max(), 0.0).astype(np.float32))
    assert inverted < 0.02 and inverted < 0.1 * moved, (inverted, moved)
    assert change(t2_like(t1)) < 0.5 * moved, (change(t2_like(t1)), moved)


def shifted_pair(shift: int = 2):
    """(T1-like atlas, T2-like scan = the atlas moved by ``shift`` voxels along the last axis),
    both cut from one larger phantom so the shift is exact."""
    margin = 3
    big = t1_phantom(margin=margin)
    depth, height, width = SHAPE

    def cut(offset):
        return big[margin:margin + depth, margin:margin + height,
                   margin + offset:margin + offset + width]

    return cut(0), t2_like(cut(shift))


@pytest.mark.parametrize("stages", ["mind_only", "mind_then_ncc"])
def test_a_known_shift_between_a_t1_and_a_t2_phantom_is_recovered(stages):
    atlas, scan = shifted_pair(2)
    settings = RefinementSettings(similarity="mind", factor=1, coarse_factor=2,
                                  mind_coarse_steps=60, mind_steps=0, mind_learning_rate=0.25,
                                  weight_smooth=1.0, steps=0 if stages == "mind_only" else 10)
    refinement = Refinement(None, atlas / atlas.max(), settings)
    outputs = refinement(tf.constant((scan / scan.max())[None, ..., None]), full_grid=True)
    inside = (scan > 0)[4:-4, 4:-4, 4:-4]
    found = outputs["flow"][0, 4:-4, 4:-4, 4:-4].numpy()[inside].mean(axis=0)
    # the atlas is pulled from 2 voxels further along the last axis
    np.testing.assert_allclose(found, [0.0, 0.0, 2.0], atol=0.5 if stages == "mind_only" else 0.3)
    if stages == "mind_then_ncc":  # the scan seen by NCC: mapped to the atlas's contrast
        mapped = outputs["scan"][0].numpy()
        assert np.corrcoef(mapped[scan > 0], np.roll(atlas, -2, axis=2)[scan > 0])[0, 1] > 0.8


def test_descriptors_are_made_once_per_scan(tmp_path, monkeypatch):
    """The atlas's once per process, each scan's once, whatever the number of steps: never inside
    the refinement's loop (counted where they are made: the one trace of ``mind_ssc``)."""
    from ltnet_tf.io import volumes as data
    from ltnet_tf.prediction.predictor import Predictor
    from ltnet_tf.registration.atlases import AtlasSet

    traced = []
    original = mind.mind_ssc
    monkeypatch.setattr(mind, "mind_ssc", lambda *a, **k: traced.append(1) or original(*a, **k))
    paths = synthetic.make_demo_dataset(str(tmp_path), n_scans=2, shape=SHAPE, seed=5)
    atlases = AtlasSet.load([paths["atlas"]], [paths["atlas_labels"]])
    predictor = Predictor(atlases, None, similarity="mind", refinement=RefinementSettings(
        mind_coarse_steps=7, mind_steps=3, steps=2))
    for path in paths["images"]:
        scan = data.load_scan(path)
        result = predictor.segment(scan)
        assert result["similarity"] == "mind"
    descriptors = predictor.refiner_for("mind").refinement.descriptors
    assert descriptors.calls == 1 + len(paths["images"])  # the atlas, then each scan
    assert len(traced) == 1  # one trace of the descriptors, none in the steps
