"""Brain-size checks (ltnet_tf.io.plausibility): each refusal names the cause its figures point to."""
import numpy as np
import pytest

from ltnet_tf.commands import synthetic
from ltnet_tf.io import plausibility, volumes as data

SHAPE = (24, 28, 32)


def brain(voxel_mm=6.0, background=0.0):
    """The skull-stripped phantom, head-sized with 6 mm voxels (about 0.85 litres of tissue)."""
    tissues = synthetic.phantom_tissues(SHAPE)
    inside = synthetic.TISSUE_LABEL_IDS[tissues] > 0
    image = np.where(inside, synthetic.TISSUE_INTENSITIES[tissues], background)
    return data.Volume(image.astype(np.float32), synthetic.demo_affine(SHAPE, voxel_mm), "b.nii")


def check(volume):
    return plausibility.check_brain_size(volume, 500.0, 2800.0)


def test_a_brain_passes_and_its_background_value_does_not_matter():
    volume_ml = check(brain())
    assert 500 < volume_ml < 2800
    assert check(brain(background=-1024.0)) == pytest.approx(volume_ml)
    with_outliers = brain()
    with_outliers.data[0, 0, :12] = [32000, -32000] * 6
    assert check(with_outliers) == pytest.approx(volume_ml)


def test_voxel_sizes_too_large_for_any_head():
    with pytest.raises(data.DataError, match=r"^b.nii: .* litres of tissue spanning .*more than "
                                             r"any head: the voxel sizes in its header "
                                             r"\(16 x 16 x 16 mm\) are likely too large"):
        check(brain(voxel_mm=16.0))


def test_a_whole_head_is_told_to_be_skull_stripped():
    tissues = synthetic.phantom_tissues(SHAPE)
    head = data.Volume((synthetic.TISSUE_INTENSITIES[tissues] + 0.3 * (tissues > 0))
                       .astype(np.float32), synthetic.demo_affine(SHAPE, 8.0), "head.nii")
    with pytest.raises(data.DataError, match=r"^head.nii: does not look skull-stripped \(.* "
                                             r"litres of tissue spanning .*strip the skull"):
        check(head)


def test_a_slab_or_tiny_voxels_are_named():
    with pytest.raises(data.DataError, match=r"^b.nii: does not look like a brain scan \(.* in a "
                                             r"field of view of only 48 x 56 x 64 mm, shorter "
                                             r"than a brain\): a slab .*\(2 x 2 x 2 mm\) too small"):
        check(brain(voxel_mm=2.0))
    small = brain()
    small.data[:] = 0
    small.data[10:13, 10:13, 10:13] = 1.0
    with pytest.raises(data.DataError, match=r"^b.nii: does not look like a brain scan \(6 ml "
                                             r"of tissue spanning 18 x 18 x 18 mm"):
        check(small)
