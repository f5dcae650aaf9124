"""predict.py with several atlases (no network, or a run folder's G_F for the primary atlas): label
fusion, the tie rule, atlases on other grids, atlases of other labelling protocols, folders of
atlases, and what prediction.json records. Real NIfTI files on tiny synthetic grids.

Why exact comparisons hold: the atlases are registered in one batch whose loss is a sum over the
atlases (``refinement.GridStage``), so each atlas's displacement is the one it gets alone, and
each atlas's labels are pulled with the same function as for a single atlas (``native``). Fusion
then only chooses, per voxel, among the single-atlas labels.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO, SHAPE, SUBPROCESS_TIMEOUT, the_error_line, write_nifti
from ltnet_tf.commands import cli, synthetic
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import volumes as data
from ltnet_tf.io.labels import structure_name
from ltnet_tf.prediction import cohort
from ltnet_tf.registration import alignment, native
from ltnet_tf.registration.atlases import AtlasSet

pytestmark = pytest.mark.slow  # trains runs with several atlases; predict.py in fresh processes (CI runs -m slow too)

REFINE = RefinementSettings(steps=2, coarse_steps=3)
# Fusion's exact relations hold for the fused labels as the transfer makes them: the intensity
# model that finishes them (tests/test_intensity_model.py) is off here.
REFINE_FLAGS = ["--refine_steps=2", "--refine_coarse_steps=3", "--noqc", "--intensity_model=off"]


def segmentations(out, names) -> dict:
    return {name: np.asarray(nib.load(os.path.join(out, f"{name}_seg.nii.gz")).dataobj)
            for name in names}


def foreground_agreement(first: np.ndarray, second: np.ndarray) -> float:
    """Fraction of the voxels labelled in either segmentation that carry the same label."""
    either = (first != 0) | (second != 0)
    return float(np.mean(first[either] == second[either]))


class Runs:
    """Predictions of the session's scans with sets of atlases, each made once per module."""

    def __init__(self, root, dataset, atlas_files):
        self.root, self.dataset, self.files = root, dataset, atlas_files
        self.names = [data.scan_name(p) for p in dataset.images]
        self._done = {}

    def get(self, atlases: tuple, fusion: str = "local") -> SimpleNamespace:
        key = (atlases, fusion)
        if key not in self._done:
            out = self.root / f"{'+'.join(atlases)}-{fusion}"
            options = cohort.PredictOptions(refinement=REFINE, qc=False, fusion=fusion,
                                            intensity_model="off")
            result = cohort.predict_files(self.dataset.images_dir, str(out),
                                          self.dataset.labels_dir,
                                          atlas=",".join(self.files[a] for a in atlases),
                                          options=options)
            self._done[key] = self.read(out, result["dice"]["mean_dice"])
        return self._done[key]

    def read(self, out, mean_dice=None) -> SimpleNamespace:
        prediction = json.loads((out / "prediction.json").read_text())
        if mean_dice is None:
            mean_dice = prediction["mean_dice"]
        return SimpleNamespace(out=out, segmentations=segmentations(out, self.names),
                               mean_dice=mean_dice, prediction=prediction)


@pytest.fixture(scope="module")
def atlas_files(dataset, tmp_path_factory):
    """The session's atlas ('atlas'), a byte copy of it ('copy'), and two more atlases: scans of
    another seed, i.e. the phantom deformed and in another contrast ('b', 'c'), each with its label
    map beside it as <name>_labels.nii.gz."""
    root = tmp_path_factory.mktemp("atlases")
    other = synthetic.make_demo_dataset(str(root / "other"), n_scans=2, shape=SHAPE, seed=11)
    folder = root / "atlases"
    folder.mkdir()
    sources = {"copy": (dataset.atlas, dataset.atlas_labels),
               "b": (other["images"][0], other["labels"][0]),
               "c": (other["images"][1], other["labels"][1])}
    files = {"atlas": dataset.atlas}
    for name, (image, labels) in sources.items():
        files[name] = str(shutil.copy(image, folder / f"{name}.nii.gz"))
        shutil.copy(labels, folder / f"{name}_labels.nii.gz")
    return files


@pytest.fixture(scope="module")
def runs(dataset, atlas_files, tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("runs"), dataset, atlas_files)


# ------------------------------------------------------------------------------- fusion
@pytest.mark.parametrize("fusion", ["local", "jlf"])
def test_two_atlases_fuse(runs, fusion):
    """Weighted fusion of two different atlases: every fused label is one of the two single-atlas
    labels at that voxel, each atlas wins somewhere, and the fused Dice is at least the worse
    single atlas's."""
    single_a, single_b = runs.get(("atlas",)), runs.get(("b",))
    fused = runs.get(("atlas", "b"), fusion)
    a_wins = b_wins = 0
    for name, segmentation in fused.segmentations.items():
        a, b = single_a.segmentations[name], single_b.segmentations[name]
        assert np.all((segmentation == a) | (segmentation == b)), name
        a_wins += int(np.sum((segmentation == a) & (segmentation != b)))
        b_wins += int(np.sum((segmentation == b) & (segmentation != a)))
    assert a_wins > 0 and b_wins > 0, (a_wins, b_wins)  # neither atlas simply copied
    worse = min(single_a.mean_dice, single_b.mean_dice)
    assert fused.mean_dice >= worse, (fused.mean_dice, single_a.mean_dice, single_b.mean_dice)
    assert fused.prediction["fusion"] == fusion
    assert fused.prediction["producer"]["fusion"] == fusion
    assert [a["name"] for a in fused.prediction["atlases"]] == ["atlas", "b"]
    assert len(fused.prediction["scans"]["scan_00"]["refinement"]["per_atlas"]) == 2


def test_majority_of_three_atlases_is_the_voxelwise_vote(runs):
    """--fusion majority with three atlases: at each voxel the label two of the single-atlas
    segmentations agree on, else the primary atlas's (the tie rule)."""
    singles = [runs.get((a,)) for a in ("atlas", "b", "c")]
    fused = runs.get(("atlas", "b", "c"), "majority")
    differs_from_each = [False, False, False]
    for name, segmentation in fused.segmentations.items():
        a, b, c = (s.segmentations[name] for s in singles)
        expected = np.where((b == c) & (b != a), b, a)
        np.testing.assert_array_equal(segmentation, expected, err_msg=name)
        for index, single in enumerate((a, b, c)):
            differs_from_each[index] |= bool(np.any(segmentation != single))
    assert all(differs_from_each)
    assert fused.prediction["fusion"] == "majority"


def test_majority_of_two_atlases_is_the_primary_atlas(runs):
    """Two atlases that disagree tie 1:1, and ties go to the primary atlas: the one-atlas result."""
    primary = runs.get(("atlas",))
    fused = runs.get(("atlas", "b"), "majority")
    differing = 0
    for name, segmentation in fused.segmentations.items():
        np.testing.assert_array_equal(segmentation, primary.segmentations[name], err_msg=name)
        differing += int(np.sum(segmentation != runs.get(("b",)).segmentations[name]))
    assert differing > 0  # b did disagree: the vote had ties to break


def test_a_copy_of_the_atlas_gives_exactly_the_one_atlas_result(runs):
    """--atlas A,A' (A' a byte copy of A under another name) with majority voting: two identical
    atlases never disagree, so no tie is even broken; the same arrays as A alone (and the same
    volumes and Dice)."""
    alone, twice = runs.get(("atlas",)), runs.get(("atlas", "copy"), "majority")
    for name, segmentation in twice.segmentations.items():
        np.testing.assert_array_equal(segmentation, alone.segmentations[name], err_msg=name)
    assert twice.mean_dice == alone.mean_dice
    assert (twice.out / "volumes.csv").read_text() == (alone.out / "volumes.csv").read_text()
    assert alone.prediction["fusion"] is None and alone.prediction["producer"]["fusion"] is None


def test_the_same_atlas_file_twice_is_refused(dataset, tmp_path, capsys):
    """--atlas A,A: two atlases of one name could not be told apart in prediction.json; refused
    before anything is written, naming the file (a copy under another name is accepted, above)."""
    out = tmp_path / "out"
    argv = ["predict.py", "--atlas", f"{dataset.atlas},{dataset.atlas}", "--images",
            dataset.images[0], "--output_dir", str(out)]
    assert cli.predict_main(argv) == 1
    the_error_line(capsys, dataset.atlas, "another atlas is also named 'atlas'")
    assert not out.exists()


def test_fusion_flag_in_a_real_process(runs, dataset, atlas_files, tmp_path):
    """predict.py --atlas A,B --fusion jlf as a process: the same segmentations as the library call,
    and the fusion and the atlases recorded."""
    out = tmp_path / "out"
    process = subprocess.run(
        [sys.executable, os.path.join(REPO, "predict.py"), "--atlas",
         f"{atlas_files['atlas']},{atlas_files['b']}", "--fusion", "jlf", "--images",
         dataset.images_dir, "--labels", dataset.labels_dir, "--output_dir", str(out),
         *REFINE_FLAGS], capture_output=True, text=True, timeout=2 * SUBPROCESS_TIMEOUT)
    assert process.returncode == 0, process.stderr
    assert "[3/3] scan_02_seg.nii.gz" in process.stdout
    in_process = runs.get(("atlas", "b"), "jlf")
    from_process = runs.read(out)
    for name, segmentation in from_process.segmentations.items():
        np.testing.assert_array_equal(segmentation, in_process.segmentations[name])
    record = from_process.prediction
    assert record["fusion"] == "jlf" and record["network"] is False
    assert [(a["name"], a["image"], a["labels"]) for a in record["atlases"]] == [
        ("atlas", os.path.abspath(dataset.atlas), os.path.abspath(dataset.atlas_labels)),
        ("b", os.path.abspath(atlas_files["b"]),
         os.path.abspath(atlas_files["b"].replace(".nii.gz", "_labels.nii.gz")))]
    assert [a["aligned_to_primary"] for a in record["atlases"]] == [None, None]  # one grid


# ------------------------------------------------------------------------------- folders of atlases
def test_folders_of_atlases_are_matched_by_name(runs, dataset, atlas_files, tmp_path):
    """--atlas DIR --atlas_labels DIR pairs files by name, the first by name is the primary one;
    the same segmentations as the atlases given one by one."""
    images, labels = tmp_path / "atlas_images", tmp_path / "atlas_labels"
    images.mkdir(), labels.mkdir()
    # Label maps named as their images, listed in the other order by the file system.
    for name in ("b", "atlas"):
        shutil.copy(atlas_files[name], images / f"{name}.nii.gz")
        source = (dataset.atlas_labels if name == "atlas"
                  else atlas_files[name].replace(".nii.gz", "_labels.nii.gz"))
        shutil.copy(source, labels / f"{name}.nii.gz")
    out = tmp_path / "out"
    cohort.predict_files(dataset.images_dir, str(out), dataset.labels_dir, atlas=str(images),
                         atlas_labels=str(labels),
                         options=cohort.PredictOptions(refinement=REFINE, qc=False,
                                                       intensity_model="off"))
    record = json.loads((out / "prediction.json").read_text())
    assert [(a["name"], a["image"], a["labels"]) for a in record["atlases"]] == [
        (name, str(images / f"{name}.nii.gz"), str(labels / f"{name}.nii.gz"))
        for name in ("atlas", "b")]
    assert record["fusion"] == "jlf"  # predict.py's default
    expected = runs.get(("atlas", "b"), "jlf")
    for name, segmentation in segmentations(out, runs.names).items():
        np.testing.assert_array_equal(segmentation, expected.segmentations[name])


def test_a_folder_of_atlases_with_an_unmatched_label_map_is_refused(dataset, atlas_files,
                                                                   tmp_path, capsys):
    images, labels = tmp_path / "atlas_images", tmp_path / "atlas_labels"
    images.mkdir(), labels.mkdir()
    shutil.copy(dataset.atlas, images / "atlas.nii.gz")
    shutil.copy(dataset.atlas_labels, labels / "atlas.nii.gz")
    stray = str(shutil.copy(dataset.atlas_labels, labels / "other.nii.gz"))
    out = tmp_path / "out"
    argv = ["predict.py", "--atlas", str(images), "--atlas_labels", str(labels), "--images",
            dataset.images[0], "--output_dir", str(out)]
    assert cli.predict_main(argv) == 1
    the_error_line(capsys, stray, "'other'")
    assert cli.predict_main(argv[:3] + argv[5:]) == 1  # a folder without --atlas_labels
    the_error_line(capsys, str(images), "--atlas_labels")
    assert not out.exists()


# ------------------------------------------------------------------------------- label protocols
def relabelled_atlas(atlas_files, folder, name, mapping) -> str:
    """Atlas 'b' with its label IDs changed by ``mapping`` {old: new}; returns the image path."""
    folder.mkdir(exist_ok=True)
    labels = nib.load(atlas_files["b"].replace(".nii.gz", "_labels.nii.gz"))
    values = np.asarray(labels.dataobj).astype(np.int32)
    changed = values.copy()
    for old, new in mapping.items():
        changed[values == old] = new
    write_nifti(folder / f"{name}_labels.nii.gz", changed, labels.affine)
    return str(shutil.copy(atlas_files["b"], folder / f"{name}.nii.gz"))


def test_an_atlas_of_another_labelling_protocol_is_refused(dataset, atlas_files, tmp_path,
                                                           capsys):
    """Label IDs mostly disjoint from the primary atlas's: one line naming the file and the IDs,
    before anything is written."""
    foreground = [i for i in dataset.label_ids if i != 0]
    other = relabelled_atlas(atlas_files, tmp_path / "other", "other_protocol",
                             {i: 1000 + i for i in foreground[1:]})  # shares one ID of 10
    out = tmp_path / "out"
    assert cli.predict_main(["predict.py", "--atlas", f"{dataset.atlas},{other}", "--images",
                             dataset.images_dir, "--output_dir", str(out)]) == 1
    line = the_error_line(capsys, str(tmp_path / "other" / "other_protocol_labels.nii.gz"),
                          dataset.atlas_labels, "label IDs differ")
    assert f"{1000 + foreground[1]}" in line and f"{foreground[1]}" in line
    assert not out.exists()


def test_an_atlas_that_differs_in_one_rare_id_is_accepted_with_a_warning(
        runs, dataset, atlas_files, tmp_path, caplog):
    """An aseg that has 5th-Ventricle (72) where the primary has 43: accepted, one warning naming
    the IDs; the rare ID gets its own column in volumes.csv."""
    rare = relabelled_atlas(atlas_files, tmp_path / "rare", "rare", {43: 72})
    caplog.set_level("WARNING")
    out = tmp_path / "out"
    result = cohort.predict_files(dataset.images_dir, str(out), dataset.labels_dir,
                                  atlas=f"{dataset.atlas},{rare}",
                                  options=cohort.PredictOptions(refinement=REFINE, qc=False))
    warnings = [r.getMessage() for r in caplog.records if "are only in" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "[43]" in warnings[0] and "[72]" in warnings[0] and "rare_labels.nii.gz" in warnings[0]
    assert len(result["outputs"]) == 3
    with open(out / "volumes.csv", newline="") as f:
        header = next(csv.reader(f))
    assert structure_name(72) in header and structure_name(43) in header
    assert set(json.loads((out / "dice.json").read_text())["structures"]) >= {"43", "72"}


# ------------------------------------------------------------------------------- another grid
HEAD_SHAPE, HEAD_VOXEL_MM = (24, 28, 32), 6.0  # a head-sized phantom in world units


def oblique_grid():
    """An anisotropic grid tilted 10 degrees about the left-right axis, its origin 270 mm off."""
    angle = np.deg2rad(10)
    rotation = np.eye(3)
    rotation[1:, 1:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    shape, voxel_sizes = (30, 30, 38), np.array([5.0, 6.5, 5.5])
    centre = np.array([-80.0, -200.0, -165.0])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(voxel_sizes)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    moved = np.eye(4)
    moved[:3, 3] = centre  # the head moved there too, as in another scanner session
    return affine, shape, moved


@pytest.fixture(scope="module")
def head_sized(tmp_path_factory):
    """A head-sized data set, and its atlas resampled onto the oblique grid twice (two files)."""
    root = tmp_path_factory.mktemp("head")
    demo = synthetic.make_demo_dataset(str(root / "demo"), n_scans=2, shape=HEAD_SHAPE, seed=1,
                                       voxel_mm=HEAD_VOXEL_MM)
    affine, shape, moved = oblique_grid()
    oblique = {}
    for name in ("oblique", "oblique2"):
        for path, suffix, order, loader in ((demo["atlas"], "", 1, data.load_scan),
                                            (demo["atlas_labels"], "_labels", 0,
                                             data.load_label_map)):
            volume = alignment.resample_onto(loader(path), affine, shape, order=order,
                                             world_transform=np.linalg.inv(moved))
            data.save_nifti(volume.data, volume.affine, str(root / f"{name}{suffix}.nii.gz"))
        oblique[name] = str(root / f"{name}.nii.gz")
    return SimpleNamespace(root=root, oblique=oblique, **demo)


def test_an_atlas_on_another_grid_reads_its_labels_through_the_composed_map(head_sized):
    """The atlas's labels stay on its own grid; with no displacement, the primary grid's voxels
    read them through the alignment at (nearly) the primary atlas's own labels."""
    atlases = AtlasSet.load([head_sized.atlas, head_sized.oblique["oblique"]],
                            [head_sized.atlas_labels,
                             head_sized.oblique["oblique"].replace(".nii.gz", "_labels.nii.gz")])
    oblique = atlases.atlases[1]
    assert oblique.labels.shape == oblique_grid()[1] and oblique.image.shape == HEAD_SHAPE
    assert oblique.alignment.ok and oblique.labels_from_grid is not None
    primary_labels = atlases.primary.labels.data
    pulled = native.NativeLabelPull(oblique.labels.data, oblique.labels_from_grid)(
        np.zeros((*HEAD_SHAPE, 3), np.float32), np.eye(4), HEAD_SHAPE, grid_shape=HEAD_SHAPE)
    # Labels resampled twice by nearest neighbour (onto 5-6.5 mm voxels and back) move boundaries
    # by up to half a voxel; a map that missed the tilt or the shift lands on other structures.
    assert foreground_agreement(pulled, primary_labels) > 0.8
    ignoring_the_alignment = native.NativeLabelPull(oblique.labels.data)(
        np.zeros((*HEAD_SHAPE, 3), np.float32), np.eye(4), HEAD_SHAPE, grid_shape=HEAD_SHAPE)
    assert foreground_agreement(ignoring_the_alignment, primary_labels) < 0.5


def test_atlases_on_another_grid_are_aligned_once_and_fused(head_sized, tmp_path, monkeypatch):
    """Two copies of the atlas on the oblique grid outvote the primary (majority): the fused labels
    are theirs, pulled through the composed map, and agree with the primary's own segmentation.
    Each is aligned to the primary atlas once, not once per scan."""
    calls = []
    align = alignment.AtlasAligner.align

    def counted(self, scan, *args, **kwargs):
        calls.append(scan.path)
        return align(self, scan, *args, **kwargs)

    monkeypatch.setattr(alignment.AtlasAligner, "align", counted)
    options = cohort.PredictOptions(refinement=REFINE, qc=False, fusion="majority",
                                    intensity_model="off")
    outputs = {}
    for key, atlas in (("primary", head_sized.atlas),
                       ("fused", ",".join([head_sized.atlas, *head_sized.oblique.values()]))):
        outputs[key] = tmp_path / key
        cohort.predict_files(head_sized.images_dir, str(outputs[key]), head_sized.labels_dir,
                             atlas=atlas, options=options)
    assert sorted(calls) == sorted(head_sized.oblique.values())  # 2 scans, on the primary grid
    record = json.loads((outputs["fused"] / "prediction.json").read_text())
    assert [a["name"] for a in record["atlases"]] == ["atlas", "oblique", "oblique2"]
    assert record["atlases"][0]["aligned_to_primary"] is None
    for aligned in record["atlases"][1:]:
        assert aligned["aligned_to_primary"]["ok"] is True
        assert aligned["labels"].endswith("_labels.nii.gz")
        # The head was moved 270 mm: the alignment found it (translation column, RAS mm).
        found = np.asarray(aligned["aligned_to_primary"]["atlas_to_scan_world_ras"])
        np.testing.assert_allclose(found[:3, 3], oblique_grid()[2][:3, 3], atol=6.0)
    names = [data.scan_name(p) for p in head_sized.images]
    primary = segmentations(outputs["primary"], names)
    fused = segmentations(outputs["fused"], names)
    for name in names:
        assert fused[name].shape == HEAD_SHAPE
        agreement = foreground_agreement(fused[name], primary[name])
        # 0.85 measured; the labels read without the alignment agree at < 0.2.
        assert 0.7 < agreement < 1.0, (name, agreement)
    primary_dice = json.loads((outputs["primary"] / "dice.json").read_text())["mean_dice"]
    assert record["mean_dice"] > primary_dice - 0.1, (record["mean_dice"], primary_dice)


# ------------------------------------------------------------------------------- with a network
def test_a_run_folder_with_an_extra_atlas(trained_run, dataset, atlas_files, tmp_path, capsys):
    """--model_dir RUN --atlas B: the run's atlas is the primary one and G_F starts its
    registration; B starts from the identity; the labels are fused."""
    out = tmp_path / "out"
    assert cli.predict_main(["predict.py", "--model_dir", trained_run.path, "--atlas",
                             atlas_files["b"], "--images", dataset.images_dir, "--labels",
                             dataset.labels_dir, "--output_dir", str(out), "--fusion", "jlf",
                             *REFINE_FLAGS]) == 0
    assert "mean Dice" in capsys.readouterr().out
    record = json.loads((out / "prediction.json").read_text())
    assert record["network"] is True and record["model_dir"] == trained_run.path
    assert [(a["name"], a["image"]) for a in record["atlases"]] == [
        ("atlas", trained_run.atlas_path), ("b", os.path.abspath(atlas_files["b"]))]
    assert record["fusion"] == "jlf" and record["refinement"]["start"] == "network"
    for scan in record["scans"].values():
        assert "network" in scan["seconds"] and len(scan["refinement"]["per_atlas"]) == 2
    # Refinement cannot be switched off: the network registers the primary atlas only.
    assert cli.predict_main(["predict.py", "--model_dir", trained_run.path, "--atlas",
                             atlas_files["b"], "--images", dataset.images_dir, "--output_dir",
                             str(tmp_path / "norefine"), "--norefine"]) == 1
    the_error_line(capsys, "several atlases")
    assert not (tmp_path / "norefine").exists()


def test_the_network_starts_the_primary_atlas_only(trained_run, dataset, atlas_files):
    """With no refinement steps the displacements are their starts: G_F's for the run's atlas,
    zero for the extra atlas."""
    from ltnet_tf.prediction.predictor import Predictor
    from ltnet_tf.prediction.sources import RunFolderNetwork

    atlases, run = cohort.load_atlases(trained_run.path, atlas_files["b"])
    network = RunFolderNetwork(run.path)
    predictor = Predictor(atlases, network, refinement=RefinementSettings(
        steps=0, coarse_steps=0, jit_compile=False), fusion_method="majority")
    scan = data.load_scan(dataset.images[0])
    result = predictor.segment(scan)
    start = network.working_displacement(scan)
    assert np.abs(start).max() > 0
    primary, extra = result["displacement"].element(0), result["displacement"].element(1)
    (primary_start, factor), *corrections = primary
    assert factor == run.load_config().downsample
    np.testing.assert_array_equal(primary_start.numpy(), start)
    np.testing.assert_array_equal(extra[0][0].numpy(), np.zeros_like(start))
    for values, _ in [*corrections, *extra[1:]]:
        assert not np.any(values.numpy())  # 0 steps: no correction
    assert result["segmentation"].shape == scan.shape
