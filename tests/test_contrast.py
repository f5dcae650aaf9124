"""Scans of another contrast mapped to the atlas's (ltnet_tf.registration.contrast)."""
import numpy as np
import pytest

from ltnet_tf.commands import synthetic
from ltnet_tf.io import intensity, volumes as data
from ltnet_tf.registration import contrast

SHAPE = (24, 28, 32)


def test_an_inverted_and_a_flair_like_scan_are_mapped_back_to_the_atlas_contrast():
    tissues = synthetic.phantom_tissues(SHAPE)
    atlas = np.where(tissues > 0, synthetic.TISSUE_INTENSITIES[tissues], 0).astype(np.float32)
    atlas_normalized = intensity.normalize_array(atlas)
    inside = atlas > 0
    levels = np.unique(atlas[inside])
    inverted = np.where(inside, atlas.max() + 0.1 - atlas, 0).astype(np.float32)
    # FLAIR-like: the darkest tissue (fluid) stays darkest, the others swap their order
    rank = np.searchsorted(levels, atlas)
    flair = np.where(inside, np.where(rank == 0, 0.1, 1.0 - 0.1 * rank), 0).astype(np.float32)
    for scan in (inverted, flair):
        before = np.corrcoef(intensity.normalize_array(scan)[inside], atlas_normalized[inside])
        mapped = contrast.atlas_like(data.Volume(scan, np.eye(4), "s"), atlas_normalized).data
        after = np.corrcoef(mapped[inside], atlas_normalized[inside])[0, 1]
        assert after > 0.95 > before[0, 1]
        assert np.all(mapped[~inside] == 0)


def test_normalised_gradient_fields_ignore_the_contrast_but_not_the_position():
    import tensorflow as tf

    from ltnet_tf.config import ConfigError, RefinementSettings
    from ltnet_tf.registration.gradient_fields import FixedScanNGF

    tissues = synthetic.phantom_tissues(SHAPE)
    atlas = np.where(tissues > 0, synthetic.TISSUE_INTENSITIES[tissues], 0).astype(np.float32)
    atlas = intensity.normalize_array(atlas)
    inverted = np.where(atlas > 0, 1.0 - atlas, 0).astype(np.float32)
    ngf = FixedScanNGF(SHAPE)
    terms = ngf.scan_sums(tf.constant(atlas[None]))
    same_place = float(ngf(terms, tf.constant(inverted[None]))[0])
    moved = float(ngf(terms, tf.constant(np.roll(inverted, 3, axis=0)[None]))[0])
    assert same_place < moved
    assert float(ngf(terms, tf.constant(atlas[None]))[0]) == pytest.approx(same_place, abs=0.1)
    with pytest.raises(ConfigError, match="similarity"):
        RefinementSettings(similarity="mi")


@pytest.mark.parametrize("similarity", ["remap"])
def test_an_inverted_scan_is_segmented_through_the_contrast_mapping(tmp_path, similarity):
    """predict.py's --similarity remap on a scan whose tissue contrast is inverted: segmented
    about as well as the same scan in the atlas's contrast, and the record says so."""
    import dataclasses

    from ltnet_tf.config import RefinementSettings
    from ltnet_tf.io import evaluation
    from ltnet_tf.prediction.predictor import Predictor
    from ltnet_tf.registration.atlases import AtlasSet

    paths = synthetic.make_demo_dataset(str(tmp_path), n_scans=1, shape=SHAPE, seed=3)
    atlases = AtlasSet.load([paths["atlas"]], [paths["atlas_labels"]])
    scan = data.load_scan(paths["images"][0])
    labels = data.load_label_map(paths["labels"][0]).data
    inside = scan.data > 0
    inverted = dataclasses.replace(scan, data=np.where(
        inside, scan.data.max() * 1.1 - scan.data, 0).astype(np.float32))
    ids = [i for i in np.unique(labels) if i != 0]

    def dice(predictor, volume):
        result = predictor.segment(volume)
        return evaluation.mean_dice(evaluation.dice_per_label(result["segmentation"], labels,
                                                              ids), ids), result

    plain = Predictor(atlases, None, refinement=RefinementSettings(), similarity="ncc")
    t1_dice, _ = dice(plain, scan)
    chosen = Predictor(atlases, None, refinement=RefinementSettings(), similarity=similarity)
    inverted_dice, result = dice(chosen, inverted)
    assert result["similarity"] == similarity
    assert inverted_dice > t1_dice - 0.05, (inverted_dice, t1_dice)
