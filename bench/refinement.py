"""Test-time refinement on real brains: what one Adam step costs, and the Dice it buys (how the
defaults of ``ltnet_tf.config.RefinementSettings`` were chosen). A trained run folder's G_F and
the data's atlas; sub-06/07 scored on the 28 structures at full resolution, with the folding
fraction of the full-grid displacement in the brain.

    python -m bench.refinement --model_dir RUN                # 25-60 min on 2 CPU cores
    python -m bench.refinement --model_dir RUN --parts speed

Parts: ``speed`` (one step's wall and CPU seconds: a naive step, ``Refinement`` without and with
XLA at factors 1, 2, 4; one process, interleaved), ``dice`` (Dice, folds and seconds against steps
for each ``--settings``). Retired parts (end_to_end, saved_model: the in-graph pipeline of
commit 7d5496b) are accepted and skipped.
Writes bench/results/refinement.json and refinement.md (hand-written findings below its marker
are kept).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import os
import time

import numpy as np
import tensorflow as tf
import voxelmorph as vxm
from absl import app, flags

from bench import harness
from bench.harness import table
from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.io.labels import BENCHMARK_LABELS
from ltnet_tf.registration import losses, transfer
from ltnet_tf.registration.refinement import Refinement, resample_displacement, to_grid
from ltnet_tf.serving.modeldir import ModelDir

NOTES_MARKER = "<!-- findings: written by hand, kept when the tables are rewritten -->"
PARTS = ("speed", "dice")

harness.define_flags("refinement", work=False, merge=True)
flags.DEFINE_string("model_dir", None, "Trained run folder (G_F, config).", required=True)
flags.DEFINE_enum("checkpoint", "auto", ["auto", "best", "last"], "Checkpoint of G_F.")
flags.DEFINE_list("subjects", ["sub-06", "sub-07"], "Validation subjects (images/, labels/).")
flags.DEFINE_list("parts", list(PARTS), "Parts to run (end_to_end, saved_model: retired).")
flags.DEFINE_integer("speed_steps", 10, "Steps per timed call in the speed part.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (medians reported).")
flags.DEFINE_list("settings", [
    "2:0.1:1:0/10/25/50/100", "2:0.2:1:10/25/50", "2:0.05:1:25/50", "2:0.1:0.5:25/50",
    "2:0.1:2:25/50", "2:0.1:4:25/50", "2:0.2:2:25/50", "4:0.1:1:25/50/100", "1:0.1:1:10/25",
    "2:0.2:4:10/25/50", "2:0.3:4:10/25", "2:0.2:8:25/50", "4>2:0.2:4:25/0/5/10/25",
    "4>2:0.1:1:25/10/25", "4>2:0.2:4:50/10"],
    "Dice settings: factor:learning_rate:weight_smooth:steps/steps/...; a factor C>F is coarse to "
    "fine: the first number of steps at grid factor C, then each later number at F.")
FLAGS = flags.FLAGS


def timed(function, *args, **kwargs):
    """(result with tensors fetched, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t,
                                   function(*args, **kwargs))
    return result, time.perf_counter() - wall, time.process_time() - cpu


def parse_setting(text: str) -> dict:
    factor, learning_rate, weight_smooth, steps = text.split(":")
    steps, coarse = [int(s) for s in steps.split("/")], None
    if ">" in factor:
        coarse, factor = factor.split(">")
        coarse = (int(coarse), steps.pop(0))
    return dict(factor=int(factor), learning_rate=float(learning_rate),
                weight_smooth=float(weight_smooth), steps=steps, coarse=coarse)


def make_refinement(label_transfer, setting: dict, **options) -> Refinement:
    coarse_factor, coarse_steps = setting["coarse"] or (None, 0)
    return Refinement.for_label_transfer(
        label_transfer, factor=setting["factor"], learning_rate=setting["learning_rate"],
        weight_smooth=setting["weight_smooth"], coarse_factor=coarse_factor,
        coarse_steps=coarse_steps, **options)


class NaiveStep:
    """What a first version does: Keras Adam on a tf.Variable, VoxelMorph's SpatialTransformer,
    ``losses.LocalNCC`` and ``losses.smoothness``, one tf.function call per step."""

    def __init__(self, config, atlas_grid, scan_grid, flow_start):
        self.atlas, self.scan = atlas_grid[None, ..., None], scan_grid[..., None]
        self.flow, self.ncc = tf.Variable(flow_start), losses.LocalNCC(config.ncc_window)
        self.transformer = vxm.layers.SpatialTransformer(fill_value=None)
        self.optimizer = tf.keras.optimizers.Adam(0.1)
        self.weight_smooth = config.weight_smooth

    @tf.function
    def step(self):
        with tf.GradientTape() as tape:
            warped = self.transformer([self.atlas, self.flow])
            loss = self.ncc(self.scan, warped) + self.weight_smooth * losses.smoothness(self.flow)
        self.optimizer.apply_gradients([(tape.gradient(loss, self.flow), self.flow)])
        return loss


def run_speed(config, atlas, scan, flow_working) -> dict:
    """Per-step wall/CPU seconds, all variants in one process, interleaved, medians."""
    steps, naive_name = FLAGS.speed_steps, "naive (factor 2)"
    variants = {f"factor {factor}, {'XLA' if xla else 'no XLA'}": Refinement(
        config, atlas, factor=factor, coarse_steps=0, jit_compile=xla)
        for factor, xla in ((2, True), (2, False), (4, True), (4, False), (1, True))}
    atlas_grid = to_grid(atlas[None, ..., None], 2)[0]
    naive = NaiveStep(config, atlas_grid, to_grid(scan, 2), resample_displacement(
        flow_working, config.downsample / 2, atlas_grid.shape))
    first = {name: timed(r, scan, flow_working, steps=1)[1:] for name, r in variants.items()}
    first[naive_name] = timed(naive.step)[1:]
    samples = {}
    for _ in range(FLAGS.repeats):
        for name, refinement in variants.items():
            for n in (0, steps):
                samples.setdefault((name, n), []).append(
                    timed(refinement, scan, flow_working, steps=n)[1:])
        samples.setdefault((naive_name, 1), []).extend(timed(naive.step)[1:] for _ in range(3))
    results = {}
    for name in variants:
        zero = np.median(samples[(name, 0)], 0)
        per_step = (np.median(samples[(name, steps)], 0) - zero) / steps
        results[name] = {"step_wall": float(per_step[0]), "step_cpu": float(per_step[1]),
                         "zero_steps_wall": float(zero[0]), "zero_steps_cpu": float(zero[1]),
                         "grid": list(variants[name].grid_shape)}
    naive_median = np.median(samples[(naive_name, 1)], 0)
    results[naive_name] = {"step_wall": float(naive_median[0]), "step_cpu": float(naive_median[1]),
                           "grid": list(atlas_grid.shape)}
    for name, r in results.items():
        r["first_call"] = {"wall": first[name][0], "cpu": first[name][1]}
        print(f"speed {name:18s}: step {r['step_wall']:.3f} s wall, {r['step_cpu']:.3f} s CPU",
              flush=True)
    return results


def run_dice(label_transfer, subjects, this_run: dict) -> list:
    """Dice, folds and seconds per setting and step count; each row records ``this_run``."""
    rows = []
    for text in FLAGS.settings:
        setting = parse_setting(text)
        factor = str(setting["factor"])
        if setting["coarse"]:
            factor = f"{setting['coarse'][0]} ({setting['coarse'][1]} steps) > {factor}"
        refinement = make_refinement(label_transfer, setting)
        timed(refinement, subjects[0]["scan"], subjects[0]["flow_working"], steps=1,
              full_grid=True)  # compile
        for steps in setting["steps"]:
            row = {"factor": factor, "learning_rate": setting["learning_rate"],
                   "weight_smooth": setting["weight_smooth"], "steps": steps, "subjects": {}}
            for s in subjects:
                out, wall, cpu = timed(refinement, s["scan"], s["flow_working"], steps=steps,
                                       full_grid=True)
                flow = tf.constant(out["flow"])
                segmentation = transfer.warp_labels(label_transfer.atlas_labels, flow,
                                                    label_transfer.atlas_cells)[0].numpy()
                row["subjects"][s["name"]] = {
                    "dice": evaluation.mean_dice(evaluation.dice_per_label(
                        segmentation, s["labels"], BENCHMARK_LABELS), BENCHMARK_LABELS),
                    "folding": evaluation.folding_fraction(flow[0].numpy(), s["brain"]),
                    "refine_wall": wall, "refine_cpu": cpu,
                    "loss_start": float(out["loss_start"][0]), "loss": float(out["loss"][0])}
            row.update(mean_dice=float(np.mean([v["dice"] for v in row["subjects"].values()])),
                       run=this_run)
            rows.append(row)
            print(f"dice {text} steps {steps:3d}: {row['mean_dice']:.4f}", flush=True)
    return rows


def short(commit: str) -> str:
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def markdown(results: dict) -> list:
    lines = ["# Test-time refinement: step cost and Dice on real brains", "",
             f"Machine: {results['machine']}  ", f"G_F: `{results['checkpoint']}` "
             f"(working grid {results['working_shape']})", "",
             "Each part was produced by the command and at the commit given for it:", "",
             *table(["part", "command", "commit"], [[p, f"`{r['command']}`",
                                                      f"`{short(r['commit'])}`"]
                                                     for p, r in results["runs"].items()]), ""]
    if "speed" in results:
        lines += ["## One Adam step (median; the same process, variants interleaved)", "", *table(
            ["variant", "grid", "step wall (s)", "step CPU (s)", "0-step call wall (s)",
             "first call wall (s)"],
            [[n, "x".join(map(str, r["grid"])), f"{r['step_wall']:.3f}", f"{r['step_cpu']:.3f}",
              f"{r.get('zero_steps_wall', float('nan')):.2f}", f"{r['first_call']['wall']:.1f}"]
             for n, r in results["speed"].items()]), ""]
    if "dice" in results:
        names, runs = list(results["dice"][0]["subjects"]), []
        for row in results["dice"]:
            runs += [row["run"]] if row["run"] not in runs else []
        lines += ["## Dice (28 structures) vs steps", "",
                  "Refine seconds: the refinement call alone (grid resampling, the steps, the "
                  "final loss, the upsampling to the full grid), wall with CPU in brackets. Folds: "
                  "voxels of the scan's brain (nonzero voxels) where the full-grid displacement's "
                  "Jacobian determinant is <= 0.", "", *table(
                      ["factor", "lr", "weight_smooth", "steps", "mean Dice",
                       *(f"{n} {c}" for n in names for c in ("Dice", "folds in brain",
                                                              "refine s (CPU s)")), "run"],
                      [[r["factor"], r["learning_rate"], r["weight_smooth"], r["steps"],
                        f"**{r['mean_dice']:.4f}**",
                        *(c for s in r["subjects"].values() for c in (
                            f"{s['dice']:.4f}", f"{100 * s['folding']:.3f}%",
                            f"{s['refine_wall']:.1f} ({s['refine_cpu']:.1f})")),
                        runs.index(r["run"]) + 1] for r in results["dice"]]), "",
                  *(f"Run {i + 1}: `{run['command']}` at `{short(run['commit'])}`"
                    for i, run in enumerate(runs)), ""]
    md_path = os.path.join(FLAGS.results_dir, "refinement.md")
    if os.path.exists(md_path):  # the hand-written findings below the marker are kept
        with open(md_path) as f:
            previous = f.read()
        if NOTES_MARKER in previous:
            lines.append(NOTES_MARKER + previous.split(NOTES_MARKER, 1)[1].rstrip("\n"))
    return lines


def write_outputs(results: dict) -> None:
    harness.write_json(results, os.path.join(FLAGS.results_dir, "refinement.json"))
    harness.write_markdown(markdown(results), os.path.join(FLAGS.results_dir, "refinement.md"))


def main(argv):
    del argv
    model_dir = ModelDir(FLAGS.model_dir).check()
    config = model_dir.load_config()
    generator = model_dir.restore_forward_generator(config, FLAGS.checkpoint)
    label_transfer = transfer.LabelTransfer(
        generator, config, data.load_scan(os.path.join(FLAGS.data_dir, "atlas.nii.gz")).data,
        data.load_label_map(os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz")).data)
    subjects = []
    for name in FLAGS.subjects:
        scan = data.load_scan(os.path.join(FLAGS.data_dir, "images", f"{name}.nii.gz"))
        raw = tf.constant(scan.data[None, ..., None])
        normalized = data.normalize_intensity(raw)
        _, flow_working = generator([label_transfer.atlas_working,
                                     data.to_working_grid(normalized, config)], training=False)
        subjects.append({"name": name, "raw": raw, "scan": normalized, "brain": scan.data > 0,
                         "flow_working": tf.cast(flow_working, tf.float32),
                         "labels": data.load_label_map(os.path.join(
                             FLAGS.data_dir, "labels", f"{name}.nii.gz")).data})
    roles = {FLAGS.model_dir: "RUN"}
    results = harness.read_json(os.path.join(FLAGS.results_dir, "refinement.json"), FLAGS.merge)
    results.update(machine=harness.machine_line(), working_shape="x".join(
        map(str, config.working_shape())), checkpoint=harness.portable(
        model_dir.checkpoint(FLAGS.checkpoint), roles))
    results.setdefault("runs", {})
    this_run = {"command": harness.command_line(roles), "commit": harness.git_commit()}
    for part in (p for p in FLAGS.parts if p in PARTS):
        if part != "dice" or "dice" not in results["runs"]:
            results["runs"][part] = this_run
    if "speed" in FLAGS.parts:
        results["speed"] = run_speed(config, label_transfer.atlas_full, subjects[0]["scan"],
                                     subjects[0]["flow_working"])
        write_outputs(results)
    if "dice" in FLAGS.parts:
        rows = run_dice(label_transfer, subjects, this_run)
        key = lambda row: (str(row["factor"]), row["learning_rate"], row["weight_smooth"],  # noqa
                           row["steps"])
        new = {key(row) for row in rows}
        results["dice"] = [r for r in results.get("dice", []) if key(r) not in new] + rows
        write_outputs(results)


if __name__ == "__main__":
    app.run(main)
