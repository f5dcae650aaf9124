"""Wall and CPU seconds of each stage of a warm native scan (sub-06/07, 256³) read, segmented by
``ltnet_tf.prediction.Predictor`` (trained network, default refinement) and written, in one
process; the first of ``--repeats`` rounds (tracing) left out. The CPU seconds over the cores are a
floor for a scan's wall time at these settings, however stages or scans overlap.

    python -m bench.stage_cpu --model_dir RUN        # ~1 min on 2 CPU cores; RUN: train.py's folder
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os
import tempfile

import numpy as np
from absl import app, flags

from bench import harness
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import volumes
from ltnet_tf.prediction.predictor import Predictor, StageClock
from ltnet_tf.prediction.sources import RunFolderNetwork
from ltnet_tf.registration.atlases import AtlasSet

harness.define_flags("stage_cpu", work=False)
flags.DEFINE_string("model_dir", None, "A trained run folder (train.py).")
flags.DEFINE_integer("repeats", 4, "Rounds over the two scans (the first is not counted).")
FLAGS = flags.FLAGS
STAGES = ("read", "align", "network", "refine", "labels", "write")


def one_scan(predictor: Predictor, path: str, folder: str) -> dict:
    """A scan read, segmented and written as predict.py does -> {'seconds', 'cpu_seconds'}."""
    clock = StageClock()
    with clock("read"):
        scan = volumes.load_scan(path)
    result = predictor.segment(scan)
    with clock("write"):
        volumes.save_nifti(result["segmentation"], scan.affine, os.path.join(
            folder, volumes.scan_name(path) + "_seg.nii.gz"), header=scan.header)
    return {"seconds": {**clock.seconds, **result["seconds"]},
            "cpu_seconds": {**clock.cpu_seconds, **result["cpu_seconds"]}}


def main(argv):
    del argv
    atlases = AtlasSet.load([os.path.join(FLAGS.data_dir, "atlas.nii.gz")],
                            [os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz")])
    predictor = Predictor(atlases, RunFolderNetwork(FLAGS.model_dir),
                          refinement=RefinementSettings())
    paths = [os.path.join(FLAGS.data_dir, "native", "images", f"{s}.mgz")
             for s in ("sub-06", "sub-07")]
    with tempfile.TemporaryDirectory() as folder:
        rounds = [[one_scan(predictor, p, folder) for p in paths] for _ in range(FLAGS.repeats)]
    warm = [result for round_ in rounds[1:] for result in round_]
    stages = {stage: {"wall_s": float(np.median([r["seconds"][stage] for r in warm])),
                      "cpu_s": float(np.median([r["cpu_seconds"][stage] for r in warm]))}
              for stage in STAGES}
    cores, config = os.cpu_count(), predictor.network.config
    cpu_total = sum(s["cpu_s"] for s in stages.values())
    results = {"commit": harness.git_commit(),
               "command": harness.command_line({FLAGS.model_dir: "RUN"}), "cores": cores,
               "model": {"path": "RUN", "downsample": config.downsample, "steps": config.steps},
               "warm_scans": len(warm), "stages": stages,
               "wall_s": sum(s["wall_s"] for s in stages.values()), "cpu_s": cpu_total,
               "floor_s": cpu_total / cores}
    harness.write_json(results, os.path.join(FLAGS.results_dir, "stage_cpu.json"))
    harness.write_markdown([
        "# A warm native scan's stages: wall and CPU seconds", "",
        f"sub-06 and sub-07 (native 256³), {len(warm)} warm scans, medians; trained network, "
        f"predict.py's default refinement, one atlas; {cores} cores. RUN: a run folder of "
        f"train.py (working grid 1/{config.downsample}, {config.steps} steps).", "",
        *harness.table(["stage", "wall s", "CPU s"], [
            [name, f"{s['wall_s']:.2f}", f"{s['cpu_s']:.2f}"] for name, s in stages.items()]
            + [["**sum**", f"**{results['wall_s']:.2f}**", f"**{cpu_total:.2f}**"]]), "",
        f"CPU seconds over the {cores} cores: **{results['floor_s']:.2f} s**, a floor for a "
        "scan's wall time here at these settings, however stages or scans overlap.", "",
        f"Command: `{results['command']}` at `{results['commit']}`."],
        os.path.join(FLAGS.results_dir, "stage_cpu.md"), echo=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    app.run(main)
