"""Labels pulled onto a scan's own grid (ltnet_tf.registration.native) and structure volumes."""
import numpy as np
import pytest

from ltnet_tf.registration import native, transfer as inference

SHAPE = (10, 12, 14)


def random_labels(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, np.int32)
    labels[2:8, 2:10, 2:12] = rng.choice([2, 3, 17, 255], size=(6, 8, 10))
    return labels


def smooth_flow(seed=0, amplitude=1.5):
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, amplitude, (3, 4, 5, 3)).astype(np.float32)
    from scipy import ndimage
    return np.stack([ndimage.zoom(coarse[..., c], np.divide(SHAPE, coarse.shape[:3]), order=1)
                     for c in range(3)], -1).astype(np.float32)


def test_identity_native_grid_gives_the_atlas_grid_segmentation():
    labels, flow = random_labels(), smooth_flow()
    expected = inference.warp_labels(labels, flow[None])[0].numpy()
    pulled = native.NativeLabelPull(labels)(flow, np.eye(4), SHAPE)
    assert pulled.dtype == np.int32 and pulled.shape == SHAPE
    np.testing.assert_array_equal(pulled, expected)


def test_flipped_and_permuted_native_grid():
    labels, flow = random_labels(1), smooth_flow(1)
    expected = inference.warp_labels(labels, flow[None])[0].numpy()
    # native voxel (i, j, k) is atlas voxel (D-1-k', ...): the native array is a flipped transpose
    native_array = np.flip(expected, axis=0).transpose(2, 0, 1)
    native_shape = native_array.shape
    native_to_atlas = np.zeros((4, 4))
    native_to_atlas[0, 1] = -1.0   # atlas i = D - 1 - native j
    native_to_atlas[0, 3] = SHAPE[0] - 1
    native_to_atlas[1, 2] = 1.0    # atlas j = native k
    native_to_atlas[2, 0] = 1.0    # atlas k = native i
    native_to_atlas[3, 3] = 1.0
    pulled = native.NativeLabelPull(labels)(flow, native_to_atlas, native_shape)
    np.testing.assert_array_equal(pulled, native_array)


def test_finer_native_grid_reads_the_atlas_between_voxels():
    labels = random_labels(2)
    flow = np.zeros((*SHAPE, 3), np.float32)
    native_to_atlas = np.diag([0.5, 0.5, 0.5, 1.0])  # native voxels of half the size
    native_shape = tuple(2 * s - 1 for s in SHAPE)
    pulled = native.NativeLabelPull(labels)(flow, native_to_atlas, native_shape)
    np.testing.assert_array_equal(pulled[::2, ::2, ::2], labels)  # on the atlas voxels: exact
    assert set(np.unique(pulled)) <= set(np.unique(labels))


def test_native_voxels_outside_the_atlas_are_background():
    labels = np.full(SHAPE, 7, np.int32)
    flow = np.zeros((*SHAPE, 3), np.float32)
    shift = np.eye(4)
    shift[0, 3] = -5.0  # native voxel i is atlas voxel i - 5
    pulled = native.NativeLabelPull(labels)(flow, shift, SHAPE)
    assert np.all(pulled[:4] == 0) and np.all(pulled[6:] == 7)


def test_structure_volumes_use_the_voxel_size():
    segmentation = np.zeros((4, 4, 4), np.int32)
    segmentation[:2] = 17
    segmentation[3, 0, 0] = 53
    affine = np.diag([1.2, 0.9, 0.9, 1.0])
    volumes = native.structure_volumes_mm3(segmentation, affine, [0, 17, 53, 60])
    voxel = 1.2 * 0.9 * 0.9
    assert volumes == pytest.approx({17: 32 * voxel, 53: voxel, 60: 0.0})


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow  # trains and predicts in fresh processes (CI runs -m slow too)
def test_train_and_predict_on_scans_on_their_own_grids(tmp_path, monkeypatch, capsys):
    """Scanner-like variants (RAS, anisotropic voxels, a 10° oblique tilt, origin far off) are
    aligned for training (once: cached) and segmented on their own grids, with volumes."""
    import csv
    import json
    import os

    import nibabel as nib

    from ltnet_tf.commands import cli, synthetic
    from ltnet_tf.io import volumes as data
    from ltnet_tf.registration import alignment

    monkeypatch.setenv("LTNET_CACHE_DIR", str(tmp_path / "cache"))
    shape, voxel_mm = (24, 28, 32), 6.0  # a head-sized phantom in world units
    demo = synthetic.make_demo_dataset(str(tmp_path / "demo"), n_scans=3, shape=shape, seed=1,
                                       voxel_mm=voxel_mm)
    tilt = np.eye(4)
    angle = np.deg2rad(10)
    tilt[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    tilt[:3, 3] = [-80.0, -200.0, -165.0]
    grid_shape, voxel_sizes = (30, 24, 34), np.array([5.0, 7.0, 5.5])
    grid_affine = np.diag([*voxel_sizes, 1.0])
    grid_affine[:3, 3] = tilt[:3, 3] - (np.asarray(grid_shape) - 1) / 2 * voxel_sizes
    folders = {kind: tmp_path / "native" / kind for kind in ("images", "labels")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for image_path, label_path in zip(demo["images"], demo["labels"]):
        name = os.path.basename(image_path)
        for path, folder, order, loader in ((image_path, folders["images"], 1, data.load_scan),
                                            (label_path, folders["labels"], 0, data.load_label_map)):
            moved = alignment.resample_onto(loader(path), grid_affine, grid_shape, order=order,
                                            world_transform=np.linalg.inv(tilt))
            data.save_nifti(moved.data, moved.affine, str(folder / name))

    model_dir = tmp_path / "run"
    train_argv = ["train.py", "--atlas", demo["atlas"], "--atlas_labels", demo["atlas_labels"],
                  "--unlabeled", str(folders["images"]), "--model_dir", str(model_dir),
                  "--steps=2", "--checkpoint_every=2", "--enc_features=8,8",
                  "--dec_features=8,8,8,8", "--disc_features=4,8",
                  "--noexport"]  # predict.py then reads the checkpoint: the grids are the point
    assert cli.train_main(train_argv) == 0
    cached = sorted(os.listdir(tmp_path / "cache" / "aligned"))
    assert len([n for n in cached if n.endswith(".nii.gz")]) == 3

    out = tmp_path / "out"
    assert cli.predict_main(["predict.py", "--model_dir", str(model_dir), "--images",
                             str(folders["images"]), "--labels", str(folders["labels"]),
                             "--output_dir", str(out), "--save_aligned"]) == 0
    printed = capsys.readouterr().out
    assert "aligned in" in printed and "mean Dice" in printed
    for name in ("scan_00", "scan_01", "scan_02"):
        segmentation = nib.load(out / f"{name}_seg.nii.gz")
        assert segmentation.shape == grid_shape
        np.testing.assert_allclose(segmentation.affine, grid_affine, atol=1e-4)
        values = set(np.unique(np.asarray(segmentation.dataobj)).tolist())
        assert values <= set(synthetic.DEMO_LABEL_IDS) and len(values) > 3
        assert nib.load(out / f"{name}_aligned_seg.nii.gz").shape == shape
        assert (out / f"{name}_affine.txt").read_text().startswith("#Insight Transform File")
    report = json.loads((out / "prediction.json").read_text())
    assert report["alignment_failed"] == []
    assert all(r["alignment"]["ok"] and not r["alignment"]["skipped"]
               for r in report["scans"].values())
    assert report["mean_dice"] is not None and report["mean_dice"] > 0.3
    with open(out / "volumes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["scan"] for r in rows] == ["scan_00", "scan_01", "scan_02"]
    white_matter = float(rows[0]["Left-Cerebral-White-Matter"])
    expected = (np.asarray(nib.load(out / "scan_00_seg.nii.gz").dataobj) == 2).sum() * np.prod(
        voxel_sizes)
    assert white_matter == pytest.approx(expected, rel=1e-3) and white_matter > 0

    # The same scans on the atlas grid are not aligned: the segmentation keeps the atlas grid.
    out_on_grid = tmp_path / "out_on_grid"
    assert cli.predict_main(["predict.py", "--model_dir", str(model_dir), "--images",
                             demo["images"][0], "--output_dir", str(out_on_grid)]) == 0
    report = json.loads((out_on_grid / "prediction.json").read_text())
    assert report["scans"]["scan_00"]["alignment"]["skipped"] is True
    assert nib.load(out_on_grid / "scan_00_seg.nii.gz").shape == shape
    assert not (out_on_grid / "scan_00_affine.txt").exists()


def test_stage_clock_counts_wall_and_cpu_seconds_apart():
    """A stage that sleeps takes wall time but almost no CPU; one that computes takes both. The
    benchmarks read the CPU seconds to know what a scan costs the machine's cores."""
    import time

    from ltnet_tf.prediction.predictor import StageClock

    clock = StageClock()
    with clock("sleep"):
        time.sleep(0.3)
    with clock("compute"):  # until the process has used 0.2 CPU s, however loaded the machine
        start = time.process_time()
        while time.process_time() - start < 0.2:
            sum(range(1000))
        used = time.process_time() - start
    assert set(clock.seconds) == set(clock.cpu_seconds) == {"sleep", "compute"}
    assert clock.seconds["sleep"] >= 0.3 and clock.cpu_seconds["sleep"] < 0.1
    assert clock.cpu_seconds["compute"] == pytest.approx(used, abs=0.05)
    assert clock.seconds["compute"] >= clock.cpu_seconds["compute"] - 0.05
