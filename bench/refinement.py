"""Test-time refinement benchmark on real brains: what one Adam step costs, and the Dice it buys.

The atlas of ../shared/data and a trained run folder (its G_F); validation subjects sub-06, sub-07
scored with Dice on the 28 structures of Table 1 at full resolution, and the folding fraction
(Jacobian determinant <= 0) of the full-grid displacement inside the brain (the scan's nonzero
voxels).

    python -m bench.refinement --model_dir RUN                # 25-60 min on 2 CPU cores
    python -m bench.refinement --model_dir RUN --parts speed

Parts: ``speed`` (one step's wall and CPU time: a naive step, this module without and with XLA, at
factors 1, 2, 4; in one process, interleaved), ``dice`` (Dice, folds and seconds vs steps for each
setting), ``end_to_end`` (LabelTransfer.segment with refinement, network + refinement + label warp,
per scan). Writes bench/results/refinement.json and refinement.md.
"""
from __future__ import annotations

import os
import sys

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)
from bench.provenance import DATA_DIR, git_commit, write_json

import json
import platform
import shutil
import subprocess
import tempfile
import textwrap
import time

import numpy as np
import tensorflow as tf
import voxelmorph as vxm
from absl import app, flags

from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.io.labels import BENCHMARK_LABELS
from ltnet_tf.registration import losses, transfer as inference
from ltnet_tf.registration.refinement import Refinement, resample_displacement, to_grid
from ltnet_tf.serving import export
from ltnet_tf.serving.modeldir import ModelDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES_MARKER = "<!-- findings: written by hand, kept when the tables are rewritten -->"

flags.DEFINE_string("model_dir", None, "Trained run folder (G_F, config).", required=True)
flags.DEFINE_enum("checkpoint", "auto", ["auto", "best", "last"], "Checkpoint of G_F.")
flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_list("subjects", ["sub-06", "sub-07"], "Validation subjects (images/, labels/).")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_list("parts", ["speed", "dice", "end_to_end", "saved_model"], "Parts to run.")
flags.DEFINE_integer("speed_steps", 10, "Steps per timed call in the speed part.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (medians reported).")
# factor:learning_rate:weight_smooth:steps/steps/...
flags.DEFINE_list("settings", [
    "2:0.1:1:0/10/25/50/100",
    "2:0.2:1:10/25/50",
    "2:0.05:1:25/50",
    "2:0.1:0.5:25/50",
    "2:0.1:2:25/50",
    "2:0.1:4:25/50",
    "2:0.2:2:25/50",
    "4:0.1:1:25/50/100",
    "1:0.1:1:10/25",
    "2:0.2:4:10/25/50",
    "2:0.3:4:10/25",
    "2:0.2:8:25/50",
    "4>2:0.2:4:25/0/5/10/25",
    "4>2:0.1:1:25/10/25",
    "4>2:0.2:4:50/10",
], "Dice settings: factor:learning_rate:weight_smooth:steps/steps/...; a factor written "
   "C>F (e.g. 4>2) is coarse to fine: the first number of steps at grid factor C, then each "
   "later number at F (e.g. 4>2:0.2:4:25/10/25).")
flags.DEFINE_bool("merge", True, "Keep the parts of an existing refinement.json that are not "
                  "rerun (each part records its own command and commit).")
flags.DEFINE_string("default", "4>2:0.2:4:25/10", "Setting timed end to end and in the SavedModel.")
FLAGS = flags.FLAGS


def timed(function, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process); tensors are fetched inside."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    result = tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def parse_setting(text: str) -> dict:
    factor, learning_rate, weight_smooth, steps = text.split(":")
    steps = [int(s) for s in steps.split("/")]
    coarse = None
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


# ------------------------------------------------------------------------------- the naive step
class NaiveStep:
    """What a first version does: Keras Adam on a tf.Variable, VoxelMorph's SpatialTransformer,
    ``losses.LocalNCC`` and ``losses.smoothness``, one tf.function call per step."""

    def __init__(self, config, atlas_grid, scan_grid, flow_start):
        self.atlas = atlas_grid[None, ..., None]
        self.scan = scan_grid[..., None]
        self.flow = tf.Variable(flow_start)
        self.ncc = losses.LocalNCC(config.ncc_window)
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


def run_speed(config, atlas_normalized, scan_normalized, flow_working) -> dict:
    """Per-step wall/CPU seconds, all variants in one process, interleaved, medians."""
    steps = FLAGS.speed_steps
    variants = {
        f"factor {factor}, {'XLA' if xla else 'no XLA'}": Refinement(
            config, atlas_normalized, factor=factor, coarse_steps=0, jit_compile=xla)
        for factor, xla in ((2, True), (2, False), (4, True), (4, False), (1, True))}
    atlas_grid = to_grid(atlas_normalized[None, ..., None], 2)[0]
    scan_grid = to_grid(scan_normalized, 2)
    flow_start = resample_displacement(flow_working, config.downsample / 2, atlas_grid.shape)
    naive = NaiveStep(config, atlas_grid, scan_grid, flow_start)
    first_call = {}
    for name, refinement in variants.items():
        _, wall, cpu = timed(refinement, scan_normalized, flow_working, steps=1)
        first_call[name] = {"wall": wall, "cpu": cpu}
    _, wall, cpu = timed(naive.step)
    first_call["naive (factor 2)"] = {"wall": wall, "cpu": cpu}
    samples = {}
    for _ in range(FLAGS.repeats):
        for name, refinement in variants.items():
            for n in (0, steps):
                _, wall, cpu = timed(refinement, scan_normalized, flow_working, steps=n)
                samples.setdefault((name, n), []).append((wall, cpu))
        naive_times = [timed(naive.step)[1:] for _ in range(3)]
        samples.setdefault(("naive (factor 2)", 1), []).extend(naive_times)
    results = {}
    for name in variants:
        zero = np.median(np.array(samples[(name, 0)]), 0)
        many = np.median(np.array(samples[(name, steps)]), 0)
        per_step = (many - zero) / steps
        results[name] = {"step_wall": float(per_step[0]), "step_cpu": float(per_step[1]),
                         "zero_steps_wall": float(zero[0]), "zero_steps_cpu": float(zero[1]),
                         "grid": list(variants[name].grid_shape),
                         "first_call": first_call[name]}
    naive_median = np.median(np.array(samples[("naive (factor 2)", 1)]), 0)
    results["naive (factor 2)"] = {"step_wall": float(naive_median[0]),
                                   "step_cpu": float(naive_median[1]),
                                   "grid": list(atlas_grid.shape),
                                   "first_call": first_call["naive (factor 2)"]}
    for name, r in results.items():
        print(f"speed {name:18s}: step {r['step_wall']:.3f} s wall, {r['step_cpu']:.3f} s CPU",
              flush=True)
    return results


# ------------------------------------------------------------------------------- Dice vs steps
def score(label_transfer, flow, reference, brain) -> dict:
    segmentation = inference.warp_labels(label_transfer.atlas_labels, flow,
                                         label_transfer.atlas_cells)[0].numpy()
    scores = evaluation.dice_per_label(segmentation, reference, BENCHMARK_LABELS)
    return {"dice": evaluation.mean_dice(scores, BENCHMARK_LABELS),
            "folding": evaluation.folding_fraction(flow[0].numpy(), brain)}


def run_dice(config, label_transfer, subjects, this_run: dict) -> list:
    """Dice, folds and seconds per setting and step count; each row records ``this_run`` (the
    command, and the commit when the process started: the code it runs was loaded then)."""
    rows = []
    for setting_text in FLAGS.settings:
        setting = parse_setting(setting_text)
        factor_name = str(setting["factor"])
        if setting["coarse"]:
            factor_name = f"{setting['coarse'][0]} ({setting['coarse'][1]} steps) > {factor_name}"
        refinement = make_refinement(label_transfer, setting)
        timed(refinement, subjects[0]["scan"], subjects[0]["flow_working"], steps=1,
              full_grid=True)  # compile
        for steps in setting["steps"]:
            row = {"factor": factor_name, "learning_rate": setting["learning_rate"],
                   "weight_smooth": setting["weight_smooth"], "steps": steps, "subjects": {}}
            for subject in subjects:
                outputs, wall, cpu = timed(refinement, subject["scan"], subject["flow_working"],
                                           steps=steps, full_grid=True)
                row["subjects"][subject["name"]] = {
                    **score(label_transfer, tf.constant(outputs["flow"]), subject["labels"],
                            subject["brain"]),
                    "refine_wall": wall, "refine_cpu": cpu,
                    "loss_start": float(outputs["loss_start"][0]),
                    "loss": float(outputs["loss"][0])}
            row["mean_dice"] = float(np.mean([s["dice"] for s in row["subjects"].values()]))
            row["run"] = this_run
            rows.append(row)
            print(f"dice factor {row['factor']} lr {row['learning_rate']} ws "
                  f"{row['weight_smooth']} steps {steps:3d}: {row['mean_dice']:.4f} "
                  + " ".join(f"{n} {s['dice']:.4f} fold {s['folding']:.2e} "
                             f"{s['refine_wall']:.1f}s/{s['refine_cpu']:.1f}cpu"
                             for n, s in row["subjects"].items()), flush=True)
    return rows


def run_end_to_end(label_transfer, subjects) -> dict:
    """Network + refinement + label warp per scan via LabelTransfer.segment, warm; and without."""
    setting = parse_setting(FLAGS.default)
    refinement = make_refinement(label_transfer, setting, steps=setting["steps"][0])
    refined = tf.function(lambda scan: label_transfer.segment(scan, refinement=refinement))
    plain = tf.function(label_transfer.segment)
    results = {"setting": FLAGS.default, "subjects": {}}
    for subject in subjects:
        raw = subject["raw"]
        first = timed(refined, raw)[1:] if not results["subjects"] else None
        timed(plain, raw)
        out_refined, wall, cpu = timed(refined, raw)
        out_plain, plain_wall, plain_cpu = timed(plain, raw)
        dice = {}
        for name, out in (("refined", out_refined), ("plain", out_plain)):
            scores = evaluation.dice_per_label(out["segmentation"][0], subject["labels"],
                                               BENCHMARK_LABELS)
            dice[name] = evaluation.mean_dice(scores, BENCHMARK_LABELS)
        results["subjects"][subject["name"]] = {
            "refined_wall": wall, "refined_cpu": cpu, "plain_wall": plain_wall,
            "plain_cpu": plain_cpu, "dice_refined": dice["refined"], "dice_plain": dice["plain"]}
        if first:
            results["first_call_wall"], results["first_call_cpu"] = first
        print(f"end to end {subject['name']}: refined {wall:.1f} s ({cpu:.1f} CPU) Dice "
              f"{dice['refined']:.4f}; plain {plain_wall:.1f} s ({plain_cpu:.1f} CPU) Dice "
              f"{dice['plain']:.4f}", flush=True)
    return results


# ------------------------------------------------------------------------------- SavedModel
SERVING_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    import tensorflow as tf

    saved_model, scan_path, steps, coarse_steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    start = time.perf_counter()
    model = tf.saved_model.load(saved_model)
    results = {"load_wall": time.perf_counter() - start}
    scan = tf.constant(np.load(scan_path))

    def timed(name, **kwargs):
        kwargs = {k: tf.constant(v) for k, v in kwargs.items()}
        wall, cpu = time.perf_counter(), time.process_time()
        out = model.signatures[name](scan=scan, **kwargs)["segmentation"].numpy()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    _, results["segment_first_wall"], _ = timed("segment")
    plain, results["segment_wall"], results["segment_cpu"] = timed("segment")
    _, results["refined_first_wall"], _ = timed("segment_refined", steps=1, coarse_steps=1)
    out, results["refined_0_wall"], results["refined_0_cpu"] = timed(
        "segment_refined", steps=0, coarse_steps=0)
    results["refined_0_equals_segment"] = bool((out == plain).all())
    _, results["refined_wall"], results["refined_cpu"] = timed(
        "segment_refined", steps=steps, coarse_steps=coarse_steps)
    results["imported_project"] = sorted(m for m in sys.modules
                                         if m.split(".")[0] in ("ltnet_tf", "voxelmorph"))
    results["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print("RESULT " + json.dumps(results))
""")


def run_saved_model(subjects) -> dict:
    """Export a copy of the run with segment_refined (without and with XLA), load each in a fresh
    process with plain TensorFlow (no ltnet_tf on the path), time segment vs segment_refined."""
    setting = parse_setting(FLAGS.default)
    coarse_steps = setting["coarse"][1] if setting["coarse"] else 0
    source = ModelDir(FLAGS.model_dir)
    work = tempfile.mkdtemp(prefix="refinement-export-")
    results = {"subject": subjects[0]["name"], "factor": setting["factor"],
               "steps": setting["steps"][0], "coarse_steps": coarse_steps}
    try:
        copy = ModelDir(os.path.join(work, "run"))
        os.makedirs(copy.path)
        for name in ("config.json", "atlas.nii.gz", "atlas_labels.nii.gz"):
            shutil.copy(os.path.join(source.path, name), copy.path)
        checkpoint = source.checkpoint(FLAGS.checkpoint)
        os.makedirs(copy.checkpoint_dir)
        for path in tf.io.gfile.glob(checkpoint + ".*"):
            shutil.copy(path, copy.checkpoint_dir)
        with open(os.path.join(copy.checkpoint_dir, "checkpoint"), "w") as f:
            f.write(f'model_checkpoint_path: "{os.path.basename(checkpoint)}"\n')
        scan_path = os.path.join(work, "scan.npy")
        np.save(scan_path, subjects[0]["raw"].numpy())
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS")}
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        for xla in (False, True):
            start = time.perf_counter()
            saved_model = export.export_saved_model(copy, which="last", refine_xla=xla,
                                                    refine_factor=setting["factor"])
            export_wall = time.perf_counter() - start
            size = sum(os.path.getsize(os.path.join(d, f))
                       for d, _, files in os.walk(saved_model) for f in files)
            child = subprocess.run([sys.executable, "-c", SERVING_CHILD, saved_model, scan_path,
                                    str(setting["steps"][0]), str(coarse_steps)],
                                   capture_output=True, text=True, cwd=work, env=env, timeout=1800)
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode != 0 or not lines:
                raise RuntimeError(f"serving child failed:\n{child.stderr[-3000:]}")
            variant = json.loads(lines[0][len("RESULT "):])
            variant.update(export_wall=export_wall, saved_model_mib=size / 1024 ** 2)
            results["xla" if xla else "no_xla"] = variant
            print(f"saved_model xla={xla}: {json.dumps(variant)}", flush=True)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------- outputs
def short(commit: str) -> str:
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def write_outputs(results: dict) -> None:
    write_json(results, os.path.join(FLAGS.results_dir, "refinement.json"))
    lines = ["# Test-time refinement: step cost and Dice on real brains", "",
             f"Machine: {results['machine']}  ", f"G_F: `{results['checkpoint']}` "
             f"(working grid {results['working_shape']})", "",
             "Each part was produced by the command and at the commit given for it:", "",
             "| part | command | commit |", "|---|---|---|"]
    lines += [f"| {part} | `{run['command']}` | `{short(run['commit'])}` |"
              for part, run in results["runs"].items()]
    lines.append("")
    if "speed" in results:
        lines += ["## One Adam step (median; the same process, variants interleaved)", "",
                  "| variant | grid | step wall (s) | step CPU (s) | 0-step call wall (s) |"
                  " first call wall (s) |", "|---|---|---|---|---|---|"]
        for name, r in results["speed"].items():
            lines.append(f"| {name} | {'x'.join(map(str, r['grid']))} | {r['step_wall']:.3f} | "
                         f"{r['step_cpu']:.3f} | {r.get('zero_steps_wall', float('nan')):.2f} | "
                         f"{r['first_call']['wall']:.1f} |")
        lines.append("")
    if "dice" in results:
        names = list(results["dice"][0]["subjects"])
        runs = []
        for row in results["dice"]:
            if row["run"] not in runs:
                runs.append(row["run"])
        lines += ["## Dice (28 structures) vs steps", "",
                  "Refine seconds: the refinement call alone (grid resampling, the steps, the "
                  "final loss, the upsampling to the full grid), wall with CPU in brackets. Folds: "
                  "voxels of the scan's brain (nonzero voxels) where the full-grid displacement's "
                  "Jacobian determinant is <= 0.", "",
                  "| factor | lr | weight_smooth | steps | mean Dice | "
                  + " | ".join(f"{n} Dice | {n} folds in brain | {n} refine s (CPU s)"
                               for n in names) + " | run |",
                  "|---|---|---|---|---|" + "---|---|---|" * len(names) + "---|"]
        for row in results["dice"]:
            cells = [f"{s['dice']:.4f} | {100 * s['folding']:.3f}% | "
                     f"{s['refine_wall']:.1f} ({s['refine_cpu']:.1f})"
                     for s in row["subjects"].values()]
            lines.append(f"| {row['factor']} | {row['learning_rate']} | {row['weight_smooth']} | "
                         f"{row['steps']} | **{row['mean_dice']:.4f}** | " + " | ".join(cells)
                         + f" | {runs.index(row['run']) + 1} |")
        lines += [""] + [f"Run {i + 1}: `{run['command']}` at `{short(run['commit'])}`"
                         for i, run in enumerate(runs)]
        lines.append("")
    if "end_to_end" in results:
        e2e = results["end_to_end"]
        lines += [f"## End to end per scan (network + refinement + label warp), setting "
                  f"{e2e['setting']} (factor:lr:weight_smooth:steps), warm", "",
                  "| subject | refined s (CPU s) | Dice | without refinement s (CPU s) | Dice |",
                  "|---|---|---|---|---|"]
        for name, s in e2e["subjects"].items():
            lines.append(f"| {name} | {s['refined_wall']:.1f} ({s['refined_cpu']:.1f}) | "
                         f"{s['dice_refined']:.4f} | {s['plain_wall']:.1f} ({s['plain_cpu']:.1f})"
                         f" | {s['dice_plain']:.4f} |")
        if "first_call_wall" in e2e:
            lines.append(f"\nFirst call (tracing and XLA compilation included): "
                         f"{e2e['first_call_wall']:.1f} s ({e2e['first_call_cpu']:.1f} CPU s).")
        lines.append("")
    if "saved_model" in results:
        sm = results["saved_model"]
        lines += [f"## SavedModel segment_refined, loaded with plain TensorFlow in a fresh process, "
                  f"{sm['subject']}, warm", "",
                  f"coarse_steps {sm['coarse_steps']} on the working grid, then steps "
                  f"{sm['steps']} at factor {sm['factor']} (the export's defaults for the rest).",
                  "", "| export | segment s (CPU s) | segment_refined 0+0 steps s (CPU s) | "
                  "segment_refined s (CPU s) | first refined call s | load s | export s | MiB |"
                  " peak RSS GiB | 0 steps == segment | project modules imported |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in ("no_xla", "xla"):
            v = sm.get(name)
            if v:
                lines.append(
                    f"| {name.replace('_', ' ')} | {v['segment_wall']:.1f} ({v['segment_cpu']:.1f})"
                    f" | {v['refined_0_wall']:.1f} ({v['refined_0_cpu']:.1f}) | "
                    f"{v['refined_wall']:.1f} ({v['refined_cpu']:.1f}) | "
                    f"{v['refined_first_wall']:.1f} | {v['load_wall']:.1f} | "
                    f"{v['export_wall']:.1f} | {v['saved_model_mib']:.0f} | "
                    f"{v['max_rss_gib']:.1f} | {v['refined_0_equals_segment']} | "
                    f"{', '.join(v['imported_project']) or 'none'} |")
        lines.append("")
    md_path = os.path.join(FLAGS.results_dir, "refinement.md")
    if os.path.exists(md_path):  # the hand-written findings below the marker are kept
        with open(md_path) as f:
            previous = f.read()
        if NOTES_MARKER in previous:
            lines += [NOTES_MARKER + previous.split(NOTES_MARKER, 1)[1].rstrip("\n")]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    del argv
    model_dir = ModelDir(FLAGS.model_dir).check()
    config = model_dir.load_config()
    generator = model_dir.restore_forward_generator(config, FLAGS.checkpoint)
    atlas = data.load_scan(os.path.join(FLAGS.data_dir, "atlas.nii.gz"))
    atlas_labels = data.load_label_map(os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz"))
    label_transfer = inference.LabelTransfer(generator, config, atlas.data, atlas_labels.data)

    subjects = []
    for name in FLAGS.subjects:
        scan = data.load_scan(os.path.join(FLAGS.data_dir, "images", f"{name}.nii.gz"))
        labels = data.load_label_map(os.path.join(FLAGS.data_dir, "labels", f"{name}.nii.gz"))
        raw = tf.constant(scan.data[None, ..., None])
        normalized = data.normalize_intensity(raw)
        atlas_working = label_transfer.atlas_working
        _, flow_working = generator([atlas_working, data.to_working_grid(normalized, config)],
                                    training=False)
        subjects.append({"name": name, "raw": raw, "scan": normalized,
                         "flow_working": tf.cast(flow_working, tf.float32),
                         "labels": labels.data, "brain": scan.data > 0})

    results = {}
    results_path = os.path.join(FLAGS.results_dir, "refinement.json")
    if FLAGS.merge and os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    results.update({
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, TF {tf.__version__}, "
                   f"GPU: {bool(tf.config.list_physical_devices('GPU'))}",
        "checkpoint": model_dir.checkpoint(FLAGS.checkpoint),
        "working_shape": "x".join(map(str, config.working_shape())),
    })
    results.setdefault("runs", {})
    if "command" in results:  # written before parts recorded their own command
        first_run = {"command": results.pop("command"), "commit": results.pop("commit")}
        for part in ("speed", "dice", "end_to_end", "saved_model"):
            if part in results:
                results["runs"].setdefault(part, first_run)
    this_run = {"command": "python " + " ".join(sys.argv), "commit": git_commit()}
    for part in FLAGS.parts:
        if part != "dice" or "dice" not in results["runs"]:
            results["runs"][part] = this_run
    if "speed" in FLAGS.parts:
        results["speed"] = run_speed(config, label_transfer.atlas_full, subjects[0]["scan"],
                                     subjects[0]["flow_working"])
        write_outputs(results)
    if "dice" in FLAGS.parts:
        rows = run_dice(config, label_transfer, subjects, this_run)
        key = lambda row: (str(row["factor"]), row["learning_rate"], row["weight_smooth"],  # noqa
                           row["steps"])
        new_keys = {key(row) for row in rows}
        previous = results.get("dice", [])
        for row in previous:  # rows written before rows recorded their own run
            row.setdefault("run", results["runs"].get("dice", this_run))
        results["dice"] = [row for row in previous if key(row) not in new_keys] + rows
        write_outputs(results)
    if "end_to_end" in FLAGS.parts:
        results["end_to_end"] = run_end_to_end(label_transfer, subjects)
        write_outputs(results)
    if "saved_model" in FLAGS.parts:
        results["saved_model"] = run_saved_model(subjects)
        write_outputs(results)


if __name__ == "__main__":
    app.run(main)
