"""The inputs of ``bench/cohort.py`` and how its segmentations are compared: the native cohort
(symlinks), small copies of a scan for the memory part, bad inputs for the refusal part, Dice
against reference label maps and voxel differences between two output folders.

Nothing here imports TensorFlow (nibabel, numpy, ltnet_tf.io.evaluation only).
"""
from __future__ import annotations

import os
import shutil

import nibabel as nib
import nibabel.processing
import numpy as np

from ltnet_tf.io import evaluation
from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name


def native_cohort(data_dir: str, work: str, scans, copies: int) -> str:
    """A folder of the native scans ``scans`` (native/images/<scan>.mgz) and ``copies`` renamed
    copies of each (<scan>b, <scan>c, ...: symlinks); -> its path."""
    folder = os.path.join(work, "inputs", "native")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for scan in scans:
        source = os.path.join(data_dir, "native", "images", f"{scan}.mgz")
        if not os.path.isfile(source):
            raise SystemExit(f"{source}: no such native scan")
        for suffix in ["", *"bcdefghijklmnopqrstuvwxyz"[:copies]]:
            os.symlink(source, os.path.join(folder, f"{scan}{suffix}.mgz"))
    return folder


def small_copies(data_dir: str, work: str, scan: str, counts) -> list:
    """[a folder of ``count`` copies, for each of ``counts``] of the native scan ``scan``
    resampled to 2 mm voxels (128³, linear; nibabel's conform), written once as NIfTI, then
    copied under other names (scan-001.nii.gz, ...)."""
    source = os.path.join(data_dir, "native", "images", f"{scan}.mgz")
    small = nibabel.processing.conform(nib.load(source), out_shape=(128, 128, 128),
                                       voxel_size=(2.0, 2.0, 2.0), order=1, orientation="LIA",
                                       out_class=nib.Nifti1Image)
    folders = []
    for count in counts:
        folder = os.path.join(work, "inputs", f"small_{count}")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        names = [os.path.join(folder, f"scan-{i:0{len(str(count))}d}.nii.gz")
                 for i in range(1, count + 1)]
        nib.save(small, names[0])
        for name in names[1:]:
            shutil.copyfile(names[0], name)
        folders.append(folder)
    return folders


BAD_INPUTS = {"truncated": "a .nii.gz cut to half its bytes (sub-06)",
              "flat": "a 2D image: one 256×256 slice of sub-06",
              "not_brain": "a 256³ 1 mm volume whose tissue is a ball 40 mm across (33 ml)"}


def bad_inputs(data_dir: str, work: str) -> dict:
    """{name: path} of the bad inputs of ``BAD_INPUTS``, written into ``work``."""
    folder = os.path.join(work, "inputs", "bad")
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, f"{name}.nii.gz") for name in BAD_INPUTS}
    with open(os.path.join(data_dir, "images", "sub-06.nii.gz"), "rb") as f:
        whole = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(whole[:len(whole) // 2])
    native = nib.load(os.path.join(data_dir, "native", "images", "sub-06.mgz"))
    middle = np.asarray(native.dataobj)[:, :, native.shape[2] // 2]
    nib.save(nib.Nifti1Image(middle, native.affine), paths["flat"])
    z, y, x = np.ogrid[-128:128, -128:128, -128:128]
    ball = z * z + y * y + x * x <= 20 ** 2
    values = np.random.default_rng(0).integers(100, 200, ball.shape, dtype=np.uint8) * ball
    nib.save(nib.Nifti1Image(values, np.diag([1.0, 1.0, 1.0, 1.0])), paths["not_brain"])
    return paths


def score(output_dir: str, references: dict) -> dict:
    """Dice of each <scan>_seg.nii.gz in ``output_dir`` against its reference on the 28
    structures: {'per_subject', 'per_structure', 'mean_dice' (mean over subjects)}."""
    per_subject, per_label = {}, {label: [] for label in BENCHMARK_LABELS}
    for scan, reference_path in references.items():
        segmentation = np.asanyarray(nib.load(os.path.join(output_dir,
                                                           f"{scan}_seg.nii.gz")).dataobj)
        reference = np.asanyarray(nib.load(reference_path).dataobj)
        if segmentation.shape != reference.shape:
            raise SystemExit(f"{output_dir}/{scan}_seg.nii.gz: grid {segmentation.shape} is "
                             f"not its reference's {reference.shape}")
        dice = evaluation.dice_per_label(segmentation, reference, BENCHMARK_LABELS)
        per_subject[scan] = _rounded(evaluation.mean_dice(dice, BENCHMARK_LABELS))
        for label, value in dice.items():
            per_label[label].append(value)
    return {"per_subject": per_subject,
            "per_structure": {structure_name(label): _rounded(_finite_mean(values))
                              for label, values in per_label.items()},
            "mean_dice": _rounded(_finite_mean(per_subject.values()))}


def _finite_mean(values) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _rounded(value):
    """JSON has no NaN: a Dice that is undefined (a structure in neither map) is None."""
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


def voxels_differing(folder_a: str, folder_b: str) -> dict:
    """{scan: {'differ': voxels labelled differently, 'labelled': voxels labelled in either}}
    for every <scan>_seg.nii.gz of two output folders."""
    counts = {}
    for name in sorted(os.listdir(folder_a)):
        if name.endswith("_seg.nii.gz"):
            a = np.asanyarray(nib.load(os.path.join(folder_a, name)).dataobj)
            b = np.asanyarray(nib.load(os.path.join(folder_b, name)).dataobj)
            counts[name[:-len("_seg.nii.gz")]] = {"differ": int((a != b).sum()),
                                                  "labelled": int(((a > 0) | (b > 0)).sum())}
    return counts
