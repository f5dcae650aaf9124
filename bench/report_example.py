"""A realistic ``report.html`` without running a model, to look at the QC pictures and the page.

    python -m bench.report_example [--data_dir ../shared/data] [--output_dir bench/scratch/report]
    python -m bench.report_screenshot bench/scratch/report/report.html

Stand-ins, said so on the page: each subject's FreeSurfer ``aseg`` (native/labels/) shifted by
one voxel plays the segmentation of its native scan (native/images/), scored against the unshifted
aseg, so the Dice values and outlines are real figures of a slightly wrong segmentation. sub-06 is
also shown as an LPS scan with 1.2 x 0.9 x 0.9 mm voxels; sub-07 gets a failed-alignment flag and
a warning, so the page shows a flagged scan. Timings, alignment figures and refinement losses are
made up (this bench runs no alignment); the pictures, volumes and Dice are computed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from nibabel import processing  # noqa: E402

from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name  # noqa: E402
from ltnet_tf.reporting import qc  # noqa: E402
from ltnet_tf.reporting import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Scan:  # the fields of ltnet_tf.io.volumes.Volume that qc reads, without importing TensorFlow
    def __init__(self, data, affine, path):
        self.data, self.affine, self.path = data, affine, path


def load(path, labels=False):
    image = nib.load(path)
    if labels:
        return np.asarray(image.dataobj).astype(np.int32), image.affine
    return image.get_fdata(dtype=np.float32), image.affine


def anisotropic_lps(scan, labels, affine):
    """The same brain as an LPS scan with 1.2 x 0.9 x 0.9 mm voxels (labels by nearest label)."""
    zooms = np.array([1.2, 0.9, 0.9])
    shape = tuple(int(n) for n in np.ceil(256 / zooms))
    target = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    centre = affine[:3, :3] @ (np.array(scan.shape) / 2) + affine[:3, 3]
    target[:3, 3] = centre - target[:3, :3] @ (np.array(shape) / 2)
    resample = processing.resample_from_to
    new_scan = resample(nib.Nifti1Image(scan, affine), (shape, target), order=1)
    new_labels = resample(nib.Nifti1Image(labels, affine), (shape, target), order=0)
    return (new_scan.get_fdata(dtype=np.float32), np.asarray(new_labels.dataobj).astype(np.int32),
            target)


def record(name, scan, reference, affine, output_dir, *, failed=False, warnings=()):
    segmentation = np.roll(reference, 1, axis=0)  # the stand-in: one voxel off
    started = time.perf_counter()
    picture = f"{name}_qc.png"
    qc.save_scan_qc_png(Scan(scan, affine, f"{name}.nii.gz"), segmentation,
                        os.path.join(output_dir, picture), title=f"{name}: stand-in segmentation",
                        warnings=list(warnings))
    qc_seconds = time.perf_counter() - started
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
    ids = [i for i in BENCHMARK_LABELS]
    volumes = {structure_name(i): round(float(np.count_nonzero(segmentation == i) * voxel_mm3), 1)
               for i in ids}
    dice = {}
    for i in ids:
        a, b = segmentation == i, reference == i
        total = np.count_nonzero(a) + np.count_nonzero(b)
        dice[structure_name(i)] = round(2 * np.count_nonzero(a & b) / total, 4) if total else None
    values = [v for v in dice.values() if v is not None]
    overlap, correlation = (0.81, 0.44) if failed else (0.95, 0.71)
    return {"image": f"{name}.nii.gz", "output": f"{name}_seg.nii.gz", "qc_png": picture,
            "alignment": {"brain_overlap": overlap, "correlation": correlation,
                          "mutual_information": 0.62, "seconds": 0.8, "skipped": False,
                          "atlas_to_scan_world_ras": np.eye(4).tolist()},
            "alignment_ok": not failed,
            "seconds": {"align": 0.8, "network": 1.9, "refine": 3.1, "pull": 0.4,
                        "qc": round(qc_seconds, 2), "total": 6.6},
            "refinement": {"loss_start": -0.412, "loss": -0.455},
            "volumes_mm3": volumes, "dice": dice, "mean_dice": float(np.mean(values)),
            "warnings": list(warnings)}, qc_seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "bench", "work", "report"))
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    native = os.path.join(args.data_dir, "native")
    scans, timings = {}, {}
    for subject in ("sub-06", "sub-07"):
        scan, affine = load(os.path.join(native, "images", f"{subject}.mgz"))
        labels, _ = load(os.path.join(native, "labels", f"{subject}.mgz"), labels=True)
        failed = subject == "sub-07"
        warnings = (["alignment looks wrong (brain overlap 0.81 < 0.85, intensity correlation "
                     "0.44 < 0.58): check the header orientation"] if failed else [])
        scans[subject], timings[subject] = record(subject, scan, labels, affine, args.output_dir,
                                                  failed=failed, warnings=warnings)
        if subject == "sub-06":
            name = "sub-06_LPS_aniso"
            scans[name], timings[name] = record(name, *anisotropic_lps(scan, labels, affine),
                                                args.output_dir)
    prediction = {"model_dir": None, "source": "stand-in: FreeSurfer aseg shifted by one voxel",
                  "atlases": [{"image": "atlas.nii.gz", "labels": "atlas_labels.nii.gz"}],
                  "fusion": None, "refinement": {"steps": 25, "coarse_steps": 25, "factor": 2},
                  "align": "auto", "alignment_failed": ["sub-07"],
                  "mean_dice": float(np.mean([r["mean_dice"] for r in scans.values()])),
                  "scans": scans}
    started = time.perf_counter()
    path = report.write_report_html(args.output_dir, prediction)
    print(f"report: {path} ({os.path.getsize(path) / 1e3:.0f} kB, "
          f"written in {time.perf_counter() - started:.2f} s)")
    for name, seconds in timings.items():
        png = os.path.join(args.output_dir, scans[name]["qc_png"])
        print(f"QC picture {png}: {os.path.getsize(png) / 1e3:.0f} kB in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
