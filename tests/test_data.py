"""Tests of ltnet_tf.io.volumes on tiny NIfTI files written with nibabel."""
import logging as pylogging
import os

import nibabel as nib
import numpy as np
import pytest

from ltnet_tf.config import LTNetConfig
from ltnet_tf.io import pairs
from ltnet_tf.io import volumes as data
from ltnet_tf.io.volumes import DataError
from ltnet_tf.training import dataset as datasets

import tensorflow as tf  # noqa: E402  (after ltnet_tf, which selects Keras 2)

AFFINE = np.array([[-1.0, 0, 0, 4.5], [0, 1, 0, -3.5], [0, 0, 1, -6.0], [0, 0, 0, 1]])


def small_config(**changes):
    """Two U-Net levels so that tiny grids are padded to multiples of 4 * downsample."""
    return LTNetConfig().replace(enc_features=[4, 4], dec_features=[4, 4], **changes)


def write(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def random_scan(shape=(8, 9, 10), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# ------------------------------------------------------------------------------------ load_scan
def test_load_scan_reads_float32_volume_and_affine(tmp_path):
    scan = random_scan()
    volume = data.load_scan(write(tmp_path / "scan.nii.gz", scan))
    assert volume.data.dtype == np.float32 and volume.shape == scan.shape
    np.testing.assert_allclose(volume.data, scan)
    assert volume.affine.dtype == np.float64 and volume.affine.shape == (4, 4)
    np.testing.assert_allclose(volume.affine, AFFINE)


def test_load_scan_squeezes_single_frame_4d_and_reads_mgz(tmp_path):
    scan = random_scan()
    assert data.load_scan(write(tmp_path / "one_frame.nii", scan[..., None])).shape == scan.shape
    mgz = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(scan, AFFINE), str(mgz))
    np.testing.assert_allclose(data.load_scan(mgz).data, scan)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="scan.nii.gz: file not found"):
        data.load_scan(tmp_path / "scan.nii.gz")


def test_non_image_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="notes.txt: not a NIfTI/MGZ image"):
        data.load_scan(text)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="corrupt.nii.gz: not a NIfTI/MGZ image"):
        data.load_scan(corrupt)


def test_2d_image(tmp_path):
    path = write(tmp_path / "flat.nii.gz", random_scan((8, 9)))
    with pytest.raises(DataError, match=r"flat.nii.gz: is 2D"):
        data.load_scan(path)


def test_4d_multi_frame_image(tmp_path):
    path = write(tmp_path / "fmri.nii.gz", random_scan((8, 9, 10, 3)))
    with pytest.raises(DataError, match=r"fmri.nii.gz: is 4D with 3 frames; expected a 3D volume"):
        data.load_scan(path)


def test_nan_voxels(tmp_path):
    scan = random_scan()  # 720 voxels of tissue: 0.5 % is 3.6
    scan[0, 0, :2] = np.nan
    scan[1, 1, 1:3] = np.inf
    with pytest.raises(DataError, match="nan.nii.gz: contains 4 NaN/Inf voxels"):
        data.load_scan(write(tmp_path / "nan.nii.gz", scan))


def test_constant_scan(tmp_path):
    path = write(tmp_path / "blank.nii.gz", np.full((8, 9, 10), 7, np.float32))
    with pytest.raises(DataError, match="blank.nii.gz: is empty/constant"):
        data.load_scan(path)
    path = write(tmp_path / "zeros.nii.gz", np.zeros((8, 9, 10), np.float32))
    with pytest.raises(DataError, match=r"zeros.nii.gz: .*every voxel is 0\): a mask that removed"):
        data.load_scan(path)


def test_messages_name_the_likely_cause(tmp_path):
    full = write(tmp_path / "full.nii.gz", random_scan((20, 20, 20)))
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(open(full, "rb").read()[:2000])
    with pytest.raises(DataError, match=r"cut.nii.gz: is truncated .*interrupted copy"):
        data.load_scan(truncated)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.nii.gz: is empty \(0 bytes\)"):
        data.load_scan(empty)
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    for i in range(3):
        (dicom / f"IM{i:04d}").write_bytes(b"DICM")
    with pytest.raises(DataError, match=r"dicom: no NIfTI/MGZ images .*3 files without "
                                        r"extension \(DICOM\? convert with dcm2niix"):
        data.list_images(dicom)
    (tmp_path / "scan.nrrd").write_bytes(b"NRRD0004")
    with pytest.raises(DataError, match=r"scan.nrrd: not a NIfTI/MGZ .*NRRD: convert"):
        data.list_images(tmp_path / "scan.nrrd")
    scan = random_scan()
    scan[0, 0, :5] = np.nan
    with pytest.raises(DataError, match=r"contains 5 NaN/Inf voxels \(0.69 %\): set them to 0"):
        data.load_scan(write(tmp_path / "nan5.nii.gz", scan))


def test_error_message_is_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.nii"
    corrupt.write_bytes(b"\x00" * 400)
    with pytest.raises(DataError) as error:
        data.load_scan(corrupt)
    assert "\n" not in str(error.value) and str(corrupt) in str(error.value)


# ------------------------------------------------------------------------------------ label maps
def test_load_label_map_gives_int32(tmp_path):
    labels = np.zeros((8, 9, 10), np.uint8)
    labels[2:5, 3:6, 4:7] = 17
    labels[0, 0, 0] = 255
    volume = data.load_label_map(write(tmp_path / "labels.nii.gz", labels))
    assert volume.data.dtype == np.int32
    np.testing.assert_array_equal(volume.data, labels)
    # Integer values stored as float are still a valid label map.
    as_float = data.load_label_map(write(tmp_path / "float.nii.gz", labels.astype(np.float32)))
    np.testing.assert_array_equal(as_float.data, labels)


def test_non_integer_labels(tmp_path):
    path = write(tmp_path / "scan_as_labels.nii.gz", random_scan())
    with pytest.raises(DataError, match="scan_as_labels.nii.gz: label values are not integers"):
        data.load_label_map(path)


def test_label_map_without_labels(tmp_path):
    path = write(tmp_path / "empty.nii.gz", np.zeros((8, 9, 10), np.int16))
    with pytest.raises(DataError, match="empty.nii.gz: .*no non-zero labels"):
        data.load_label_map(path)


def test_label_map_shape_checks(tmp_path):
    path = write(tmp_path / "labels4d.nii.gz", np.ones((8, 9, 10, 2), np.int16))
    with pytest.raises(DataError, match="is 4D with 2 frames"):
        data.load_label_map(path)


# ------------------------------------------------------------------------------------ grids
def test_grid_shape_mismatch_names_both_shapes(tmp_path):
    atlas = data.Volume(random_scan(), AFFINE, "atlas.nii.gz")
    scan = data.Volume(random_scan((8, 9, 11)), AFFINE, "/x/scan.nii.gz")
    for strict in (True, False):
        with pytest.raises(DataError, match=r"/x/scan.nii.gz: .*\(8, 9, 11\).*\(8, 9, 10\)"):
            data.check_same_grid(atlas, scan, strict=strict)


def test_grid_mismatch_says_how_the_grids_differ():
    atlas = data.Volume(random_scan(), AFFINE, "atlas.nii.gz")
    transposed = data.Volume(random_scan((10, 9, 8)), AFFINE, "scan.nii.gz")
    with pytest.raises(DataError, match=r"another axis order.*fslreorient2std"):
        data.check_same_grid(atlas, transposed, strict=True)
    finer = AFFINE @ np.diag([1.0, 1.0, 1.2, 1.0])
    with pytest.raises(DataError, match=r"voxel sizes 1 x 1 x 1 mm vs 1 x 1 x 1.2 mm"):
        data.check_same_grid(atlas, data.Volume(random_scan(), finer, "s.nii.gz"), strict=True)
    flipped = AFFINE @ np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(DataError, match=r"orientation LAS vs RAS"):
        data.check_same_grid(atlas, data.Volume(random_scan(), flipped, "s.nii.gz"), strict=True)


# ------------------------------------------------------------------------------------ sform/qform
def write_with_forms(path, array, sform, qform, sform_code=1, qform_code=1):
    image = nib.Nifti1Image(np.asarray(array), None)
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)
    nib.save(image, str(path))
    return str(path)


def test_sform_qform_disagreement_is_recorded_and_warned_once(tmp_path, caplog):
    true_affine = np.diag([0.5, 0.5, 1.0, 1.0])
    path = write_with_forms(tmp_path / "scan.nii.gz", random_scan(), np.eye(4), true_affine)
    scan = data.load_scan(path)
    conflict = scan.header_conflict
    assert conflict is not None and conflict.used == "sform" and conflict.unused == "qform"
    np.testing.assert_allclose(scan.affine, np.eye(4))  # nibabel's rule: the sform wins
    assert conflict.to_dict()["qform_voxel_mm"] == [0.5, 0.5, 1.0]
    assert conflict.to_dict()["sform_voxel_mm"] == [1.0, 1.0, 1.0]
    assert conflict.volume_ratio() == pytest.approx(0.25)
    data.load_scan(path)
    labels = np.zeros((8, 9, 10), np.int16)
    labels[2:4, 2:4, 2:4] = 17
    label_path = write_with_forms(tmp_path / "labels.nii.gz", labels, np.eye(4), true_affine)
    assert data.load_label_map(label_path).header_conflict is not None
    warnings = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()]
    assert len(warnings) == 2  # once per file, however often it is read
    assert warnings[0] == (f"{path}: its header's sform and qform disagree (sform 1 x 1 x 1 mm "
                           f"voxels, used; qform 0.5 x 0.5 x 1 mm); if the qform is right, copy "
                           f"it over the sform (fslorient -copyqform2sform {path}, or with "
                           f"nibabel img.set_sform(img.get_qform()) and save)")


def test_agreeing_or_unset_forms_are_no_conflict(tmp_path):
    same = write_with_forms(tmp_path / "same.nii.gz", random_scan(), AFFINE, AFFINE)
    only_sform = write_with_forms(tmp_path / "sform.nii.gz", random_scan(), np.eye(4),
                                  np.diag([0.5, 0.5, 1.0, 1.0]), qform_code=0)
    # A sub-voxel difference (half a voxel at most, anywhere in the grid) is not reported.
    nudged = AFFINE.copy()
    nudged[:3, 3] += 0.2
    close = write_with_forms(tmp_path / "close.nii.gz", random_scan(), nudged, AFFINE)
    for path in (same, only_sform, close):
        assert data.load_scan(path).header_conflict is None, path
    assert data.load_scan(write(tmp_path / "plain.nii.gz", random_scan())).header_conflict is None


def test_grid_affine_mismatch_strict_and_not(monkeypatch):
    atlas = data.Volume(random_scan(), AFFINE, "atlas.nii.gz")
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    scan = data.Volume(random_scan(), shifted, "/x/scan.nii.gz")
    with pytest.raises(DataError, match="/x/scan.nii.gz: .*affine"):
        data.check_same_grid(atlas, scan, strict=True)

    warnings = []
    monkeypatch.setattr(data.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
    data.check_same_grid(atlas, scan, strict=False)
    assert len(warnings) == 1
    assert "/x/scan.nii.gz" in warnings[0] and "pre-aligned" in warnings[0]
    assert "own header" in warnings[0]

    nearly = data.Volume(scan.data, AFFINE + 1e-5, "/x/near.nii.gz")
    data.check_same_grid(atlas, nearly, strict=True)  # within tolerance
    assert len(warnings) == 1


# ------------------------------------------------------------------------------------ file lists
def test_list_images_expands_folders_and_lists(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b.nii.gz", "a.nii", "c.mgz"):
        (folder / name).write_bytes(b"")
    (folder / "README.txt").write_text("ignored")
    (folder / ".b.tmp-1.nii.gz").write_bytes(b"")
    expected = [str(folder / n) for n in ("a.nii", "b.nii.gz", "c.mgz")]
    assert data.list_images(str(folder)) == expected
    assert data.list_images(folder) == expected
    extra = tmp_path / "extra.nii.gz"
    extra.write_bytes(b"")
    assert data.list_images([str(folder), str(extra)]) == expected + [str(extra)]
    assert data.list_images(f"{extra},{folder / 'a.nii'}") == [str(extra), str(folder / "a.nii")]


def test_list_images_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="empty: no NIfTI/MGZ images in folder"):
        data.list_images(empty)
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        data.list_images([str(tmp_path / "missing.nii.gz")])
    with pytest.raises(DataError, match="notes.txt: not a NIfTI/MGZ image"):
        data.list_images(str(empty / "notes.txt"))


def test_scan_name():
    assert data.scan_name("/data/sub-01.nii.gz") == "sub-01"
    assert data.scan_name("sub-02.nii") == "sub-02"
    assert data.scan_name("/x/aseg.v2.mgz") == "aseg.v2"


# ------------------------------------------------------------------------------------ saving
def test_save_nifti_is_atomic_and_keeps_affine_and_dtype(tmp_path):
    labels = np.zeros((8, 9, 10), np.int32)
    labels[1:4, 2:5, 3:6] = 53
    path = tmp_path / "out" / "scan_seg.nii.gz"
    data.save_nifti(labels, AFFINE, path)
    assert sorted(os.listdir(tmp_path / "out")) == ["scan_seg.nii.gz"]
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.affine, AFFINE)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), labels)

    labels[0, 0, 0] = 40000  # does not fit int16
    data.save_nifti(labels, AFFINE, path)  # overwrites
    assert nib.load(str(path)).get_data_dtype() == np.int32
    assert sorted(os.listdir(tmp_path / "out")) == ["scan_seg.nii.gz"]

    scan = random_scan().astype(np.float64)
    data.save_nifti(scan, AFFINE, tmp_path / "scan.nii")
    assert nib.load(str(tmp_path / "scan.nii")).get_data_dtype() == np.float32


@pytest.mark.parametrize("order", ["C", "F"])
def test_save_nifti_writes_either_memory_order_voxel_for_voxel(tmp_path, order):
    """Arrays longer than one copied slab along the first axis, 3D and 4D, in C and Fortran order."""
    rng = np.random.default_rng(3)
    for shape in [(37, 9, 10), (35, 6, 7, 3)]:
        labels = np.asarray(rng.integers(0, 60, shape), np.int32, order=order)
        path = tmp_path / f"labels{len(shape)}.nii.gz"
        data.save_nifti(labels, AFFINE, path)
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(path)).dataobj), labels)


def test_scans_and_label_maps_load_in_c_order(tmp_path):
    """NIfTI stores voxels in Fortran order; the loaded arrays are C-ordered (what numpy and
    TensorFlow use without a transposing copy), with the same voxel values."""
    values = np.asfortranarray(np.random.default_rng(0).random((12, 13, 14), dtype=np.float32))
    nib.save(nib.Nifti1Image(values, AFFINE), str(tmp_path / "scan.nii.gz"))
    scan = data.load_scan(tmp_path / "scan.nii.gz")
    assert scan.data.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(scan.data, values)
    labels = np.asfortranarray((values > 0.5).astype(np.int16) * 17)
    nib.save(nib.Nifti1Image(labels, AFFINE), str(tmp_path / "labels.nii.gz"))
    label_map = data.load_label_map(tmp_path / "labels.nii.gz")
    assert label_map.data.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(label_map.data, labels)


def test_save_nifti_with_scaled_scan_header_keeps_label_values(tmp_path):
    """A uint8 scan with scl_slope 1/255 must not rescale the label map written with its header."""
    scan_image = nib.Nifti1Image((random_scan() * 255).astype(np.uint8), AFFINE)
    scan_image.header.set_slope_inter(1 / 255, 0)
    nib.save(scan_image, str(tmp_path / "scan.nii.gz"))
    scan = data.load_scan(tmp_path / "scan.nii.gz")
    labels = np.zeros(scan.shape, np.int32)
    labels[2:4, 2:4, 2:4] = 17
    data.save_nifti(labels, scan.affine, tmp_path / "scan_seg.nii.gz", header=scan.header)
    written = data.load_label_map(tmp_path / "scan_seg.nii.gz")
    np.testing.assert_array_equal(written.data, labels)
    np.testing.assert_allclose(written.affine, AFFINE)


def test_save_nifti_unwritable_folder(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(DataError, match="blocker"):
        data.save_nifti(np.ones((2, 2, 2), np.int16), AFFINE, blocker / "seg.nii.gz")


# ------------------------------------------------------------------------------------ label IDs
def test_label_index_round_trip():
    label_ids = [0, 2, 3, 17, 53, 2035]
    rng = np.random.default_rng(0)
    label_map = rng.choice(label_ids, size=(6, 7, 8))
    indices = data.labels_to_indices(label_map, label_ids)
    assert indices.dtype == np.int32
    assert indices.max() == len(label_ids) - 1
    np.testing.assert_array_equal(data.indices_to_labels(indices, label_ids), label_map)


def test_unknown_label_ids_map_to_background():
    label_map = np.array([[[0, 2, 5, 17, 99, -1]]])
    indices = data.labels_to_indices(label_map, [0, 17, 2])
    np.testing.assert_array_equal(indices, [[[0, 2, 0, 1, 0, 0]]])


# ------------------------------------------------------------------------------------ TF functions
@pytest.mark.parametrize("downsample", [1, 2])
def test_to_working_grid_shape(downsample):
    config = small_config(downsample=downsample)
    shape = (9, 10, 13)  # not a multiple of the grid
    volume = tf.ones((2, *shape, 3))
    working = data.to_working_grid(volume, config)
    assert tuple(working.shape) == (2, *config.working_shape(shape), 3)
    assert config.padded_shape(shape) == ((12, 12, 16) if downsample == 1 else (16, 16, 16))


def test_pad_to_shape_pads_at_the_end():
    volume = tf.ones((1, 3, 4, 5, 1))
    padded = data.pad_to_shape(volume, (4, 4, 8)).numpy()
    assert padded.shape == (1, 4, 4, 8, 1)
    assert padded[0, :3, :, :5].min() == 1 and padded.sum() == 3 * 4 * 5


def test_pooled_onehot_sums_to_one_inside_the_volume():
    config = small_config(downsample=2)
    shape = (9, 10, 13)
    indices = np.random.default_rng(0).integers(0, 4, shape)
    onehot = tf.one_hot(indices[None], 4)
    fractions = data.to_working_grid(onehot, config).numpy()[0]
    inside = tuple(slice(0, s // 2) for s in shape)  # working voxels whose block is all inside
    np.testing.assert_allclose(fractions[inside].sum(-1), 1.0, atol=1e-6)
    assert fractions.min() >= 0

    # The atlas version counts padding as background, so it sums to 1 everywhere, and is the same
    # whether the labels are pooled all at once or a few at a time.
    chunked = data.atlas_onehot_working(indices, 4, config.replace(label_chunk=3))
    assert chunked.shape == (*config.working_shape(shape), 4) and chunked.dtype == np.float32
    np.testing.assert_allclose(chunked.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(chunked[inside], fractions[inside], atol=1e-6)
    np.testing.assert_allclose(data.atlas_onehot_working(indices, 4, config), chunked, atol=1e-6)


def test_normalize_intensity_range():
    rng = np.random.default_rng(0)
    scans = np.stack([rng.normal(100, 20, (6, 7, 8, 1)), rng.normal(-5, 1, (6, 7, 8, 1)),
                      np.full((6, 7, 8, 1), 3.0)]).astype(np.float32)
    normalized = data.normalize_intensity(tf.constant(scans)).numpy()
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized[:2].min(axis=(1, 2, 3, 4)), 0.0, atol=1e-6)
    np.testing.assert_allclose(normalized[:2].max(axis=(1, 2, 3, 4)), 1.0, atol=1e-6)
    np.testing.assert_array_equal(normalized[2], 0.0)  # constant scan: zeros, not NaN


def test_preprocess_scan():
    config = small_config(downsample=2)
    working = data.preprocess_scan(random_scan((9, 10, 13)) * 50, config)
    assert working.shape == (*config.working_shape((9, 10, 13)), 1)
    assert working.dtype == np.float32
    assert 0 <= working.min() and working.max() <= 1


# ------------------------------------------------------------------------------------ tf.data
def marked_scans(folder, n, shape=(8, 9, 10)):
    """Scans whose voxel (2, 0, 0) normalises to k / 10 within 0.01 (the 0.5th and 99.5th
    percentiles of uniform noise are near 0 and 1), naming scan k."""
    folder.mkdir()
    paths = []
    for k in range(n):
        scan = random_scan(shape, seed=k)
        scan[0, 0, 0], scan[1, 0, 0], scan[2, 0, 0] = 0.0, 1.0, k / 10
        paths.append(write(folder / f"scan_{k}.nii.gz", scan))
    return paths


def scan_order(dataset, n):
    return [int(round(float(batch[0, 2, 0, 0, 0]) * 10)) for batch in dataset.take(n)]


def test_training_dataset_shapes_and_dtype(tmp_path):
    paths = marked_scans(tmp_path / "images", 3)
    config = small_config(downsample=1, batch_size=2, atlas_shape=[8, 9, 10])
    dataset = datasets.make_training_dataset(paths, config)
    assert dataset.element_spec.shape.as_list() == [2, *config.working_shape(), 1]
    for batch in dataset.take(3):  # repeats past the end of the 3 scans
        assert batch.dtype == tf.float32
        assert tuple(batch.shape) == (2, 8, 12, 12, 1)
    policy = dataset.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA

    ordered = datasets.make_training_dataset(tmp_path / "images", small_config(),
                                         shuffle=False, repeat=False)
    assert scan_order(ordered, 10) == [0, 1, 2]  # shape taken from the first scan, no repeat


def test_training_dataset_order_depends_on_seed(tmp_path):
    paths = marked_scans(tmp_path / "images", 6)

    def order(seed):
        config = small_config(batch_size=1, seed=seed, atlas_shape=[8, 9, 10])
        return scan_order(datasets.make_training_dataset(paths, config), 12)

    seed0, seed1 = order(0), order(1)
    assert sorted(seed0[:6]) == sorted(seed0[6:]) == list(range(6))  # each epoch is a permutation
    assert seed0[:6] != seed0[6:]  # reshuffled each epoch
    assert seed0 == order(0)  # deterministic for a seed
    assert seed0 != seed1


def test_cached_and_streamed_datasets_give_the_same_batches(tmp_path, monkeypatch):
    paths = marked_scans(tmp_path / "images", 5)
    config = small_config(batch_size=1, seed=3, atlas_shape=[8, 9, 10])
    assert datasets.dataset_fits_in_memory(5, config)
    cached = scan_order(datasets.make_training_dataset(paths, config, skip_batches=2), 12)
    monkeypatch.setattr(datasets, "CACHE_LIMIT_BYTES", 0)
    assert not datasets.dataset_fits_in_memory(5, config)
    streamed = scan_order(datasets.make_training_dataset(paths, config, skip_batches=2), 12)
    assert cached == streamed  # same seeded order, so a resumed run sees the same scans either way
    unskipped = scan_order(datasets.make_training_dataset(paths, config), 14)
    assert unskipped[2:] == streamed


def test_training_dataset_rejects_scan_on_another_grid(tmp_path):
    paths = marked_scans(tmp_path / "images", 2)
    odd = write(tmp_path / "odd.nii.gz", random_scan((8, 9, 11)))
    config = small_config(batch_size=1, atlas_shape=[8, 9, 10])
    dataset = datasets.make_training_dataset(paths + [odd], config, shuffle=False, repeat=False)
    with pytest.raises(tf.errors.OpError, match=r"odd.nii.gz: shape \(8, 9, 11\)"):
        list(dataset)


# ------------------------------------------------------------------------------------ validation
def test_load_validation_pairs_matches_by_name(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    labels = np.zeros((8, 9, 10), np.int16)
    labels[2:5, 2:5, 2:5] = 4
    for name in ("sub-02", "sub-01"):
        write(tmp_path / "images" / f"{name}.nii.gz", random_scan())
        write(tmp_path / "labels" / f"{name}.nii", labels)
    loaded = pairs.load_validation_pairs(tmp_path / "images", tmp_path / "labels")
    assert [data.scan_name(scan.path) for scan, _ in loaded] == ["sub-01", "sub-02"]
    assert all(data.scan_name(lab.path) == data.scan_name(scan.path) for scan, lab in loaded)
    assert loaded[0][1].data.dtype == np.int32

    write(tmp_path / "images" / "sub-03.nii.gz", random_scan())
    with pytest.raises(DataError, match="sub-03.nii.gz: no label map"):
        pairs.load_validation_pairs(tmp_path / "images", tmp_path / "labels")


# ------------------------------------------------------------------------------- NaN in a brain
def brain_with_nan(tmp_path, name, hole: int = 0):
    """A ball of tissue (7,208 voxels: 0.5 % is 36) in NaN, with ``hole`` NaN voxels inside it
    (a row through its centre); -> (path, voxels outside the brain)."""
    grid = np.indices((32, 32, 32)) - 15.5
    brain = (grid ** 2).sum(axis=0) < 12 ** 2
    values = np.where(brain, 100.0 + grid[0], np.nan).astype(np.float32)
    values[16, 16, 8:8 + hole] = np.nan
    path = tmp_path / name
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(path))
    return path, int((~brain).sum())


def test_nan_outside_the_brain_is_background(tmp_path, caplog):
    path, outside = brain_with_nan(tmp_path, "masked.nii.gz")
    with caplog.at_level(pylogging.WARNING):
        scan = data.load_scan(path)
        data.load_scan(path)  # read again (checked, then segmented): said once
    warnings = [record.getMessage() for record in caplog.records]
    assert np.isfinite(scan.data).all() and (scan.data == 0).sum() == outside
    assert [w for w in warnings if "NaN" in w] == [
        f"{path}: {outside} NaN/Inf voxels outside the brain, taken as background (0)"]


def test_a_few_nan_holes_inside_the_brain_are_set_to_0(tmp_path, caplog):
    """As a division or a NaN-masking step leaves a brain's interior zeros: up to 0.5 % of the
    brain's voxels become 0 with a warning giving their count; more are refused as before."""
    path, outside = brain_with_nan(tmp_path, "holed.nii.gz", hole=16)
    with caplog.at_level(pylogging.WARNING):
        scan = data.load_scan(path)
    assert np.isfinite(scan.data).all() and (scan.data[16, 16, 8:24] == 0).all()
    assert (scan.data == 0).sum() == outside + 16
    assert [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()] == [
        f"{path}: 16 NaN/Inf voxels inside the brain (0.22 % of its voxels) set to 0, and "
        f"{outside} outside it taken as background"]
    path, outside = brain_with_nan(tmp_path, "broken.nii.gz", hole=8)
    values = nib.load(str(path)).get_fdata(dtype=np.float32)
    values[14:18, 14:18, 18:23] = np.nan  # 80 voxels more: 88 of 7,208 (1.2 %)
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(path))
    with pytest.raises(DataError, match=rf"broken.nii.gz: contains 88 NaN/Inf voxels inside the "
                                        rf"brain \(and {outside} outside it\): set them to 0"):
        data.load_scan(path)
