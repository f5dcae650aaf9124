"""A ``report.html`` rendered to a PNG with headless Chromium (offline: the page needs nothing from
the network), as a user's browser shows it; without a report given, a realistic example made
without running a model (what docs/report_screenshot.png shows). Not a test: it needs a browser
(Debian: ``apt-get install chromium``).

    python docs/report_screenshot.py --output docs/report_screenshot.png
    python docs/report_screenshot.py OUT/report.html [--output page.png]

The example's stand-ins, said so on its page: each subject's FreeSurfer aseg (native/labels/)
shifted by one voxel plays the segmentation of its native scan, scored against the unshifted aseg
(real Dice and outlines of a slightly wrong segmentation); sub-06 also as an LPS scan with
1.2 x 0.9 x 0.9 mm voxels; sub-07 flagged with a failed alignment. Timings, alignment figures and
losses are made up; pictures, volumes and Dice are computed. Only file names appear on the page.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import nibabel as nib
import numpy as np
from nibabel import processing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/data beside the repository (see its README), or $LTNET_DATA_DIR.
DATA_DIR = os.environ.get("LTNET_DATA_DIR") or os.path.normpath(
    os.path.join(ROOT, "..", "shared", "data"))

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--hide-scrollbars")  # headless, offline, no user profile, no GPU


def screenshot(report: str, output: str, window_size: str = "1280,2000") -> str:
    """Render ``report`` (an HTML file) to the PNG ``output``; SystemExit when none is made."""
    found = next(filter(None, map(shutil.which, BROWSERS)), None)
    if found is None:
        raise SystemExit("no Chromium found; install it (Debian: apt-get install chromium)")
    output = os.path.abspath(output)
    if os.path.exists(output):
        os.remove(output)  # so that an old picture is never taken for a new one
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        run = subprocess.run([found, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                              f"--screenshot={output}", f"--window-size={window_size}",
                              pathlib.Path(report).resolve().as_uri()],
                             capture_output=True, text=True, timeout=120)
    if not os.path.exists(output):
        raise SystemExit(f"{report}: Chromium made no screenshot (exit {run.returncode}): "
                         f"{run.stderr.strip()[-2000:]}")
    return output


class Scan:  # the fields of ltnet_tf.io.volumes.Volume that qc reads, without TensorFlow
    def __init__(self, data, affine, path):
        self.data, self.affine, self.path = data, affine, path


def scan_record(name, scan, reference, affine, folder, failed=False) -> dict:
    """One scan's prediction.json record with a stand-in segmentation; draws its QC picture."""
    from ltnet_tf.io import evaluation
    from ltnet_tf.io.labels import BENCHMARK_LABELS, FREESURFER_COLOURS, structure_name
    from ltnet_tf.reporting import qc

    segmentation = np.roll(reference, 1, axis=0)  # one voxel off
    warnings = (["alignment looks wrong (brain overlap 0.81 < 0.85, intensity correlation 0.44 "
                 "< 0.58): check the header orientation"] if failed else [])
    qc.save_scan_qc_png(Scan(scan, affine, f"{name}.nii.gz"), segmentation,
                        os.path.join(folder, f"{name}_qc.png"),
                        colours=FREESURFER_COLOURS, title=f"{name}: stand-in segmentation",
                        warnings=warnings)
    dice = evaluation.dice_per_label(segmentation, reference, BENCHMARK_LABELS)
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
    overlap, correlation = (0.81, 0.44) if failed else (0.95, 0.71)
    return {"image": f"{name}.nii.gz", "output": f"{name}_seg.nii.gz", "qc_png": f"{name}_qc.png",
            "alignment": {"brain_overlap": overlap, "correlation": correlation,
                          "mutual_information": 0.62, "seconds": 0.8, "skipped": False,
                          "atlas_to_scan_world_ras": np.eye(4).tolist()},
            "alignment_ok": not failed,
            "seconds": {"align": 0.8, "network": 1.9, "refine": 3.1, "pull": 0.4, "qc": 0.5,
                        "total": 6.6},
            "refinement": {"loss_start": 0.717, "loss": 0.630},
            "volumes_mm3": {structure_name(i): round(float(np.count_nonzero(
                segmentation == i) * voxel_mm3), 1) for i in BENCHMARK_LABELS},
            "dice": {structure_name(i): None if np.isnan(v) else round(float(v), 4)
                     for i, v in dice.items()},
            "mean_dice": evaluation.mean_dice(dice, BENCHMARK_LABELS), "warnings": warnings}


def example_report(data_dir: str, folder: str) -> str:
    """The example report.html (see the module docstring) in ``folder``; -> its path."""
    from ltnet_tf.reporting import report

    os.makedirs(folder, exist_ok=True)
    scans = {}
    for subject in ("sub-06", "sub-07"):
        image = nib.load(os.path.join(data_dir, "native", "images", f"{subject}.mgz"))
        labels = nib.load(os.path.join(data_dir, "native", "labels", f"{subject}.mgz"))
        reference = np.asarray(labels.dataobj).astype(np.int32)
        scans[subject] = scan_record(subject, image.get_fdata(dtype=np.float32), reference,
                                     image.affine, folder, failed=subject == "sub-07")
        if subject == "sub-06":  # the same brain, LPS, 1.2 x 0.9 x 0.9 mm voxels
            zooms = np.array([1.2, 0.9, 0.9])
            shape = tuple(int(n) for n in np.ceil(256 / zooms))
            target = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
            centre = image.affine[:3, :3] @ (np.array(image.shape) / 2) + image.affine[:3, 3]
            target[:3, 3] = centre - target[:3, :3] @ (np.array(shape) / 2)
            moved = processing.resample_from_to(image, (shape, target), order=1)
            moved_labels = processing.resample_from_to(labels, (shape, target), order=0)
            scans["sub-06_LPS_aniso"] = scan_record(
                "sub-06_LPS_aniso", moved.get_fdata(dtype=np.float32),
                np.asarray(moved_labels.dataobj).astype(np.int32), target, folder)
    from ltnet_tf.io.labels import FREESURFER_COLOURS, structure_name
    return report.write_report_html(folder, {
        "label_colours": {structure_name(i): list(c) for i, c in FREESURFER_COLOURS.items()},
        "model_dir": None, "source": "stand-in: FreeSurfer aseg shifted by one voxel",
        "atlases": [{"image": "atlas.nii.gz", "labels": "atlas_labels.nii.gz"}], "fusion": None,
        "refinement": {"steps": 25, "coarse_steps": 25, "factor": 2}, "align": "auto",
        "alignment_failed": ["sub-07"], "scans": scans,
        "mean_dice": float(np.mean([r["mean_dice"] for r in scans.values()]))})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", help="the report.html to render (default: the "
                        "example, written to --work_dir)")
    parser.add_argument("--output", help="PNG to write (default: next to the report, .png)")
    parser.add_argument("--data_dir", default=DATA_DIR)
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "docs", "scratch", "report"))
    args = parser.parse_args(argv)
    report = args.report or example_report(args.data_dir, args.work_dir)
    if not os.path.isfile(report):
        raise SystemExit(f"{report}: file not found")
    output = args.output or os.path.splitext(report)[0] + ".png"
    print(f"screenshot of {report}: {screenshot(report, output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
