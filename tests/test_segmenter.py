"""The segmenter trained from the label transfer (``train.py --segmenter``): it trains a few steps
on tiny data, its labels land on the right grid, synthesised examples keep image and labels
aligned, it reads back the same in a fresh process, its SavedModel needs no project code, and bad
input is refused as today."""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO, SUBPROCESS_TIMEOUT, the_error_line, write_nifti
from ltnet_tf.commands import cli
from ltnet_tf.config import SegmenterConfig
from ltnet_tf.io import volumes as data
from ltnet_tf.registration import transfer
from ltnet_tf.segmentation import synthesis
from ltnet_tf.segmentation.export import latest_export
from ltnet_tf.segmentation.segmenter import Segmenter, label_indices_at, segmenter_folder

pytestmark = pytest.mark.slow  # trains a segmenter and exports its SavedModel (CI runs -m slow too)

STEPS = 3


@pytest.fixture(scope="module")
def segmenter_run(dataset, tmp_path_factory):
    """A segmenter trained STEPS steps from the atlas and the 3 unlabelled scans (no G_F)."""
    model_dir = tmp_path_factory.mktemp("segmenter") / "run"
    rc = cli.train_main(["train.py", "--segmenter", "--profile", "cpu", "--atlas", dataset.atlas,
                         "--atlas_labels", dataset.atlas_labels, "--unlabeled",
                         dataset.images_dir, "--model_dir", str(model_dir),
                         f"--segmenter_steps={STEPS}"])
    assert rc == 0
    return str(model_dir)


@pytest.fixture(scope="module")
def segmenter(segmenter_run):
    return Segmenter.load(segmenter_folder(segmenter_run))


def _scan(dataset, index=0):
    return data.load_scan(sorted(data.list_images(dataset.images_dir))[index])


def test_training_writes_the_segmenter_folder(segmenter_run, segmenter, dataset):
    folder = segmenter_folder(segmenter_run)
    for name in ("config.json", "network.json", "weights.h5", "training.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    assert not [n for _, _, names in os.walk(segmenter_run) for n in names
                if n.endswith((".pkl", ".pickle"))]
    with open(os.path.join(folder, "training.json")) as f:
        training = json.load(f)
    assert training["fit"]["steps"] == STEPS
    assert len(training["examples"]["pseudo"]) == 3 and len(training["examples"]["shapes"]) == 3
    assert training["teacher"]["start"] == "identity"
    assert "Lambda" not in open(os.path.join(folder, "network.json")).read()
    assert segmenter.config.label_ids == dataset.label_ids
    assert latest_export(folder) is not None


def test_output_shape_labels_and_grid(segmenter, dataset):
    scan = _scan(dataset)
    probabilities = segmenter.probabilities(scan.data)
    assert tuple(probabilities.shape) == (*segmenter.config.working_shape,
                                          len(dataset.label_ids))
    np.testing.assert_allclose(tf.reduce_sum(probabilities, -1).numpy(), 1.0, atol=1e-4)
    labels = segmenter.segment(probabilities, np.eye(4), scan.shape, scan.data != 0)
    assert labels.shape == scan.shape
    assert set(np.unique(labels)) <= set(dataset.label_ids)
    assert not labels[scan.data == 0].any()  # only inside the brain
    # The same scan on a grid with its axes permuted: each native voxel labelled where it lies.
    permutation = np.zeros((4, 4))
    permutation[[0, 1, 2], [1, 2, 0]] = 1.0  # native (a, b, c) -> grid (b, c, a)
    permutation[3, 3] = 1.0
    native = np.transpose(scan.data, (2, 0, 1))  # native[a, b, c] = scan[b, c, a]
    native_labels = segmenter.segment(probabilities, permutation, native.shape, native != 0)
    np.testing.assert_array_equal(native_labels, np.transpose(labels, (2, 0, 1)))


def test_predict_uses_the_segmenter(segmenter_run, dataset, tmp_path):
    out = tmp_path / "out"
    rc = cli.predict_main(["predict.py", "--model_dir", segmenter_run, "--images",
                           dataset.images_dir, "--output_dir", str(out), "--labels",
                           dataset.labels_dir])
    assert rc == 0
    with open(out / "prediction.json") as f:
        prediction = json.load(f)
    assert prediction["labels_by"].startswith("segmenter")
    assert prediction["segmenter"]["steps"] == STEPS
    assert prediction["refinement"] is None and not prediction["network"]
    header = open(out / "volumes.csv").readline().strip().split(",")
    assert header[-1] == "labels_by"
    assert "segmenter" in open(out / "report.html").read()
    for path in data.list_images(dataset.images_dir):
        name = data.scan_name(path)
        written, scan = nib.load(str(out / f"{name}_seg.nii.gz")), nib.load(path)
        assert written.shape == scan.shape
        np.testing.assert_allclose(written.affine, scan.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= set(dataset.label_ids)


def test_save_load_in_a_fresh_process_gives_the_same_output(segmenter_run, segmenter, dataset,
                                                            tmp_path):
    scan = _scan(dataset, 1)
    expected = segmenter.segment(segmenter.probabilities(scan.data), np.eye(4), scan.shape,
                                 scan.data != 0)
    target = tmp_path / "labels.npy"
    code = ("import sys, numpy as np; from ltnet_tf.io import volumes as data; "
            "from ltnet_tf.segmentation.segmenter import Segmenter; "
            "s = Segmenter.load(sys.argv[1]); scan = data.load_scan(sys.argv[2]); "
            "np.save(sys.argv[3], s.segment(s.probabilities(scan.data), np.eye(4), scan.shape, "
            "scan.data != 0))")
    subprocess.run([sys.executable, "-c", code, segmenter_folder(segmenter_run), scan.path,
                    str(target)], check=True, cwd=REPO, timeout=SUBPROCESS_TIMEOUT,
                   env={**os.environ, "PYTHONPATH": REPO})
    np.testing.assert_array_equal(np.load(target), expected)


def test_segment_signature_loads_without_project_code(segmenter_run, segmenter, dataset,
                                                      tmp_path):
    scan = _scan(dataset, 2)
    expected = segmenter.segment(segmenter.probabilities(scan.data), np.eye(4), scan.shape,
                                 scan.data != 0)
    np.save(tmp_path / "scan.npy", scan.data[None, ..., None].astype(np.float32))
    code = ("import sys, numpy as np, tensorflow as tf\n"
            "f = tf.saved_model.load(sys.argv[1]).signatures['segment']\n"
            "out = f(scan=tf.constant(np.load(sys.argv[2])))\n"
            "np.save(sys.argv[3], out['segmentation'].numpy())\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('ltnet_tf', 'voxelmorph', 'neurite')]\n"
            "assert not bad, bad\n"
            "try:\n"
            "    f(scan=tf.zeros([1, 7, 7, 7, 1]))\n"
            "except tf.errors.InvalidArgumentError as e:\n"
            "    print('REFUSED', ' '.join(str(e).split()))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", code, latest_export(segmenter_folder(
        segmenter_run)), str(tmp_path / "scan.npy"), str(tmp_path / "out.npy")],
        check=True, cwd=str(tmp_path), timeout=4 * SUBPROCESS_TIMEOUT, env=env,
        capture_output=True, text=True)  # a fresh TensorFlow, two graph traces: slow when shared
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy")[0], expected)
    assert "REFUSED" in found.stdout and "scan must be" in found.stdout, found.stdout


def _example_config(shape, label_ids):
    return SegmenterConfig(features=[4, 8], crop_margin=0).replace(
        atlas_shape=list(shape), crop_start=[0, 0, 0], crop_shape=list(shape),
        label_ids=label_ids, downsample=1)


def test_synthesis_keeps_labels_and_image_aligned():
    """A label-coded image and its label fractions warped by the same known displacement stay
    aligned voxel by voxel: an integer shift moves both exactly; a smooth random warp gives
    an image equal to the label intensities blended by the warped fractions."""
    rng = np.random.default_rng(0)
    shape, label_ids = (12, 14, 16), [0, 2, 4, 17]
    labels = np.asarray(label_ids)[rng.integers(0, 4, shape)]
    intensity = {0: 0.0, 2: 0.8, 4: 0.3, 17: 0.55}
    image = np.vectorize(intensity.get)(labels).astype(np.float32)
    example = synthesis.working_example("x", "shape", image, labels,
                                        _example_config(shape, label_ids), normalised=True)
    fractions = tf.constant(example.fractions, tf.float32) / 255.0
    shift = np.zeros((*shape, 3), np.float32)
    shift[..., 1] = 2.0  # pull from two voxels further along axis 1
    moved_image = synthesis.warp(tf.constant(image)[..., None], tf.constant(shift))[..., 0]
    moved_fractions = synthesis.warp(fractions, tf.constant(shift)).numpy()
    moved_labels = np.asarray(label_ids)[moved_fractions.argmax(-1)]
    np.testing.assert_array_equal(moved_labels[:, :-2], labels[:, 2:])
    np.testing.assert_allclose(moved_image.numpy()[:, :-2], image[:, 2:], atol=1e-6)
    np.testing.assert_allclose(np.vectorize(intensity.get)(moved_labels), moved_image.numpy(),
                               atol=1e-6)
    displacement = synthesis.random_displacement(
        tf.random.Generator.from_seed(1), list(shape), SegmenterConfig(deform_voxels=1.5))
    warped_image = synthesis.warp(tf.constant(image)[..., None], displacement)[..., 0].numpy()
    warped_fractions = synthesis.warp(fractions, displacement).numpy()
    blended = warped_fractions @ np.array([intensity[i] for i in label_ids], np.float32)
    np.testing.assert_allclose(warped_image, blended, atol=3e-3)  # fractions stored x255


def test_appearance_mapping_moves_each_structure_to_the_target():
    shape, label_ids = (8, 8, 8), [0, 2, 4]
    labels = np.zeros(shape, int)
    labels[2:6, 2:6, 2:6] = 2
    labels[3:5, 3:5, 3:5] = 4
    rng = np.random.default_rng(1)
    image = np.where(labels == 2, 0.8, np.where(labels == 4, 0.2, 0.0)) + \
        rng.normal(0, 0.02, shape) * (labels > 0)
    config = _example_config(shape, label_ids)
    source = synthesis.working_example("a", "shape", image, labels, config, normalised=True)
    target_image = np.where(labels == 2, 0.6, np.where(labels == 4, 0.4, 0.0)) + \
        rng.normal(0, 0.03, shape) * (labels > 0)
    target = synthesis.working_example("b", "pseudo", target_image, labels, config,
                                       normalised=True)
    scale, shift = synthesis.appearance_mapping(
        synthesis.appearance_statistics(source.image, source.fractions),
        synthesis.appearance_statistics(target.image, target.fractions))
    mapped = synthesis.map_appearance(tf.constant(source.image, tf.float32),
                                      tf.constant(source.fractions, tf.float32) / 255.0,
                                      scale, shift).numpy()
    mapped_statistics = synthesis.appearance_statistics(mapped.astype(np.float32),
                                                        source.fractions)
    wanted = synthesis.appearance_statistics(target.image, target.fractions)
    np.testing.assert_allclose(mapped_statistics[1:], wanted[1:], atol=0.01)
    assert not mapped[labels == 0].any()


def test_working_fractions_are_the_pooled_one_hot_labels():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, (20, 18, 22)) * 3
    config = SegmenterConfig(features=[4, 8], crop_margin=0).replace(
        atlas_shape=[20, 18, 22], crop_start=[2, 0, 1], crop_shape=[20, 20, 20],
        label_ids=[0, 3, 6, 9, 12])
    fractions = synthesis.working_fractions(labels, config)
    indices = tf.constant(data.labels_to_indices(labels, config.label_ids)[None, ..., None])
    pooled = synthesis.to_working(tf.cast(tf.equal(indices, tf.range(5)), tf.float32),
                                  config)[0].numpy()
    pooled[..., 0] += 1.0 - pooled.sum(-1)  # past the grid: background
    np.testing.assert_allclose(fractions / 255.0, pooled, atol=1 / 255)


def test_labels_from_coarse_probabilities_match_dense_upsampling():
    """The cheap label read-out equals the argmax of every label's interpolated probability."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 7, 8, 9)).astype(np.float32) * 3
    probabilities = tf.nn.softmax(tf.constant(logits))
    axes = [np.linspace(0, s - 1, 3 * s - 2, dtype=np.float32) for s in logits.shape[:3]]
    points = tf.constant(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3))
    dense = tf.argmax(transfer.sample_linear(probabilities, points), -1, output_type=tf.int32)
    cheap = label_indices_at(probabilities, points)
    assert np.mean(dense.numpy() == cheap.numpy()) > 0.995


def test_bad_scan_is_refused_before_anything_is_written(segmenter_run, dataset, tmp_path,
                                                        capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    bad = np.zeros((16, 20, 24), np.float32)
    bad[4, 4, 4] = np.nan
    write_nifti(folder / "broken.nii.gz", bad, dataset.affine)
    out = tmp_path / "out"
    assert cli.predict_main(["predict.py", "--model_dir", segmenter_run, "--images",
                             str(folder), "--output_dir", str(out)]) == 1
    the_error_line(capsys, "broken.nii.gz")
    assert not out.exists()
    run = tmp_path / "new_run"
    assert cli.train_main(["train.py", "--segmenter", "--atlas", dataset.atlas,
                           "--atlas_labels", dataset.atlas_labels, "--unlabeled", str(folder),
                           "--model_dir", str(run)]) == 1
    the_error_line(capsys, "broken.nii.gz")
    assert not run.exists()
