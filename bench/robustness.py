"""Robustness to a scanner/converter artefact: sub-06 (atlas grid and native 256³) as it is and x4
as int16 with 60 background voxels at +-32,000, segmented as predict.py does (``harness.Product``:
G_F alone, G_F + refinement, refinement from the identity); Dice on the 28 structures of both and
their difference (target: within 0.005). Writes bench/results/robustness.json and robustness.md.

    python -m bench.robustness --model_dir RUN
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os

import numpy as np
from absl import app, flags

from bench import harness
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import evaluation, volumes
from ltnet_tf.io.labels import BENCHMARK_LABELS

harness.define_flags("robustness")
flags.DEFINE_string("model_dir", None, "A trained run folder (the README's CPU recipe).",
                    required=True)
flags.DEFINE_integer("outliers", 60, "Background voxels set to +-32,000.")
FLAGS = flags.FLAGS


def with_artefact(scan: volumes.Volume, path: str, count: int, seed: int = 0) -> str:
    """``scan`` x4 as int16 with ``count`` background voxels at +-32,000, written to ``path``."""
    values = np.rint(np.asarray(scan.data, np.float64) * 4 * (255 if scan.data.max() <= 1 else 1))
    values = values.astype(np.int16)
    chosen = np.random.default_rng(seed).choice(np.flatnonzero(values.ravel() == 0), size=count,
                                                replace=False)
    values.reshape(-1)[chosen] = np.where(np.arange(count) < count // 2, 32000, -32000)
    volumes.save_nifti(values, scan.affine, path, dtype=np.int16)
    return path


def main(argv):
    del argv
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    data = FLAGS.data_dir
    atlas = (os.path.join(data, "atlas.nii.gz"), os.path.join(data, "atlas_labels.nii.gz"))
    segmenters = {"network alone": lambda: harness.Product(FLAGS.model_dir, None),
                  "network + refinement": lambda: harness.Product(FLAGS.model_dir,
                                                                  RefinementSettings()),
                  "identity + refinement": lambda: harness.Product(None, RefinementSettings(),
                                                                   atlases=[atlas])}
    inputs = {}
    for case, image, labels in (
            ("atlas grid", os.path.join(data, "images", "sub-06.nii.gz"),
             os.path.join(data, "labels", "sub-06.nii.gz")),
            ("native 256³", os.path.join(data, "native", "images", "sub-06.mgz"),
             os.path.join(data, "native", "labels", "sub-06.mgz"))):
        artefact = os.path.join(FLAGS.work_dir, f"{case.split()[0]}_artefact.nii.gz")
        inputs[case] = (image, with_artefact(volumes.load_scan(image), artefact, FLAGS.outliers),
                        labels)
    results = {"command": harness.command_line({FLAGS.model_dir: "RUN"}),
               "git_commit": harness.git_commit(), "model_dir": "RUN",
               "outliers": FLAGS.outliers, "cases": {}}
    for method, make in segmenters.items():
        segmenter = make()
        for case, (clean, artefact, labels) in inputs.items():
            reference, dice = volumes.load_label_map(labels).data, {}
            for version, path in (("clean", clean), ("artefact", artefact)):
                output = os.path.join(FLAGS.work_dir, f"{method}-{case}-{version}_seg.nii.gz"
                                      .replace(" ", "_"))
                dice[version] = evaluation.mean_dice(evaluation.dice_per_label(
                    segmenter.segment(path, output)["segmentation"], reference,
                    BENCHMARK_LABELS), BENCHMARK_LABELS)
            dice["difference"] = dice["artefact"] - dice["clean"]
            results["cases"].setdefault(case, {})[method] = dice
            print(f"{case}, {method}: clean {dice['clean']:.4f}, artefact {dice['artefact']:.4f} "
                  f"({dice['difference']:+.4f})", flush=True)
    harness.write_json(results, os.path.join(FLAGS.results_dir, "robustness.json"))
    harness.write_markdown([
        "# Robustness: a few extreme voxels", "",
        f"Command: `{results['command']}` at `{results['git_commit'][:12]}`; run folder "
        f"{results['model_dir']} (the README's CPU recipe).", "",
        f"sub-06 x4 stored as int16, with {FLAGS.outliers} background voxels at +-32,000, "
        "against the clean scan: mean Dice of the 28 structures against sub-06's labels.", "",
        *harness.table(["scan", "method", "clean", "with artefact", "difference"],
                       [[case, method, f"{d['clean']:.4f}", f"{d['artefact']:.4f}",
                         f"{d['difference']:+.4f}"] for case, methods in results["cases"].items()
                        for method, d in methods.items()])],
        os.path.join(FLAGS.results_dir, "robustness.md"))


if __name__ == "__main__":
    app.run(main)
