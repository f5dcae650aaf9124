"""Cohort throughput of predict.py as a user runs it: each figure from predict.py in a fresh
process (``harness.run_measured``), one run at a time after written files are flushed and a rest;
this process never imports TensorFlow.

    stages    native 256³ scans (and renamed copies) with --noqc and with QC: per-stage seconds
              from prediction.json
    memory    predict.py (--noqc) on 2 and on 100 small copies of a scan: peak RSS ratio
    refusal   bad inputs: seconds to exit, exit code, last stderr line, model files of the run
              folder opened (strace, in a second, untimed run)

    python -m bench.cohort --model_dir RUN
    python -m bench.cohort --model_dir RUN --parts memory --memory_scans 4     # a smoke test

Writes bench/results/cohort.json and cohort.md. The comparison with the code before a change
(``--before COMMIT``) and Dice at equal settings ran up to commit ecbe0b4, whose figures
cohort.json keeps (Dice of the product: ``bench.accuracy``, ``bench.fusion``).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import nibabel as nib
import nibabel.processing
import numpy as np
from absl import app, flags

from bench import harness
from bench.harness import table

PARTS = ("stages", "memory", "refusal")
BAD_INPUTS = {"truncated": "a .nii.gz cut to half its bytes (sub-06)",
              "flat": "a 2D image: one 256×256 slice of sub-06",
              "not_brain": "a 256³ 1 mm volume whose tissue is a ball 40 mm across (33 ml)"}
STAGE_ORDER = ("read", "wait", "align", "network", "refine", "labels", "network_and_labels",
               "write", "scores", "qc", "total")  # as a scan meets them
RUNS = {"noqc": "--noqc", "qc": "QC on"}

harness.define_flags("cohort", merge=True)
flags.DEFINE_string("model_dir", None, "A trained run folder (train.py).")
flags.DEFINE_list("parts", list(PARTS), "Parts to run (others kept from cohort.json: --merge).")
flags.DEFINE_list("native_scans", ["sub-06", "sub-07"], "Native scans of the stages cohort "
                  "(native/images/<name>.mgz).")
flags.DEFINE_integer("copies", 1, "Renamed copies (symlinks) of each native scan in the stages "
                     "cohort, so more scans are warm.", lower_bound=0)
flags.DEFINE_string("memory_scan", "sub-06", "Native scan copied (2 mm) for the memory part.")
flags.DEFINE_integer("memory_scans", 100, "Scans of the long memory run.", lower_bound=2)
flags.DEFINE_integer("memory_few", 2, "Scans of the short memory run.", lower_bound=1)
flags.DEFINE_float("settle_seconds", 5.0, "Rest before each measured run.", lower_bound=0)
flags.DEFINE_bool("trace", True, "Refusal: list the run folder's files opened (strace).")
FLAGS = flags.FLAGS


class Cohort:
    """The scratch folders and predict.py of this checkout, run as a user runs it; its code
    compiled, TensorFlow and the run folder read once first: no measured run pays for them."""

    def __init__(self):
        self.work = os.path.abspath(FLAGS.work_dir)
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": harness.ROOT}
        for argv in (["-m", "compileall", "-q", os.path.join(harness.ROOT, "ltnet_tf")],
                     ["-c", "from ltnet_tf import compat; import tensorflow"]):
            subprocess.run([sys.executable, *argv], capture_output=True, check=True,
                           env=self.env, cwd=self.work)
        for folder, _, names in os.walk(os.path.abspath(FLAGS.model_dir)):
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    while f.read(1 << 24):
                        pass

    def roles(self, text) -> str:
        return harness.portable(text, {self.work: "WORK", FLAGS.model_dir: "RUN",
                                       sys.executable: "python"})

    def measure(self, argv: list, log: str, check: bool = True) -> dict:
        """``argv`` with this checkout's ltnet_tf, measured (``harness.run_measured``), logs in
        WORK/logs/``log``.out/.err. SystemExit if it fails and ``check``."""
        run = harness.run_measured(argv, os.path.join(self.logs, log), env=self.env,
                                   cwd=harness.ROOT, settle_seconds=FLAGS.settle_seconds)
        if run["returncode"] != 0 and check:
            raise SystemExit(f"{shlex.join(argv)} exited with {run['returncode']} (log: "
                             f"{run['stderr']})")
        return {**run, "command": f"PYTHONPATH={harness.ROOT} {shlex.join(argv)}"}

    def predict(self, images: str, output_dir: str, log: str, extra=(), check=True) -> tuple:
        """predict.py on ``images`` into an emptied ``output_dir``, measured -> (run, argv)."""
        shutil.rmtree(output_dir, ignore_errors=True)
        argv = [sys.executable, os.path.join(harness.ROOT, "predict.py"), "--model_dir",
                os.path.abspath(FLAGS.model_dir), "--images", images, "--output_dir",
                output_dir, *extra]
        return self.measure(argv, log, check), argv

    def predict_folder(self, scans: dict, label: str, extra) -> dict:
        """predict.py on a fresh folder of ``scans`` {file name: source path} (symlinks), and the
        seconds of each scan's stages from its prediction.json (``first_and_warm``)."""
        folder = os.path.join(self.work, "inputs", label)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for name, source in scans.items():
            os.symlink(source, os.path.join(folder, name))
        output_dir = os.path.join(self.work, label)
        run, _ = self.predict(folder, output_dir, label.replace("/", "_"), extra)
        with open(os.path.join(output_dir, "prediction.json")) as f:
            seconds = {name: r["seconds"] for name, r in json.load(f)["scans"].items()}
        return {**run, "scans": seconds, **first_and_warm(seconds)}


def first_and_warm(scans: dict) -> dict:
    """{'first_scan', 'first' {stage: s}, 'warm_scans', 'warm' {stage: mean s of the others}}."""
    names, warm = list(scans), {}
    for name in names[1:]:
        for stage, value in scans[name].items():
            warm.setdefault(stage, []).append(value)
    return {"first_scan": names[0], "first": scans[names[0]], "warm_scans": names[1:],
            "warm": {stage: round(float(np.mean(v)), 3) for stage, v in warm.items()}}


# ------------------------------------------------------------------------------- parts
def stages_part(cohort: Cohort) -> dict:
    """Native scans and renamed copies, with --noqc and with QC, each run in a fresh process."""
    native = {f"{scan}{suffix}.mgz": os.path.join(FLAGS.data_dir, "native", "images",
                                                  f"{scan}.mgz")
              for scan in FLAGS.native_scans
              for suffix in ["", *"bcdefghijklmnopqrstuvwxyz"[:FLAGS.copies]]}
    runs = {}
    for label in RUNS:
        run = runs[label] = cohort.predict_folder(native, f"stages/{label}", (f"--{label}",))
        print(f"stages {label}: {run['wall_s']:.1f} s wall, {run['peak_rss_mib']:.0f} MiB, warm "
              f"{run['warm'].get('total', float('nan')):.1f} s/scan", flush=True)
    return {"cohort": list(runs["noqc"]["scans"]), "runs": runs}


def memory_part(cohort: Cohort) -> dict:
    """Peak RSS of predict.py (--noqc) on few and on many 2 mm copies of a scan."""
    small = os.path.join(cohort.work, "inputs", f"{FLAGS.memory_scan}_2mm.nii.gz")
    os.makedirs(os.path.dirname(small), exist_ok=True)
    nib.save(nibabel.processing.conform(
        nib.load(os.path.join(FLAGS.data_dir, "native", "images", f"{FLAGS.memory_scan}.mgz")),
        out_shape=(128, 128, 128), voxel_size=(2.0, 2.0, 2.0), order=1, orientation="LIA",
        out_class=nib.Nifti1Image), small)
    runs = {}
    for label, count in (("few", FLAGS.memory_few), ("many", FLAGS.memory_scans)):
        run = cohort.predict_folder({f"scan-{i:0{len(str(count))}d}.nii.gz": small
                                     for i in range(1, count + 1)}, f"memory/{label}",
                                    ("--noqc",))
        runs[label] = {**run, "scans": len(run["scans"]),
                       "totals": [r["total"] for r in run["scans"].values()]}
        print(f"memory {len(run['scans'])} scans: {run['peak_rss_mib']:.0f} MiB", flush=True)
    return {"scan": f"{FLAGS.memory_scan} resampled to 2 mm voxels, 128³ (NIfTI)", "runs": runs,
            "target_ratio": 1.10, "peak_rss_ratio": round(
                runs["many"]["peak_rss_mib"] / runs["few"]["peak_rss_mib"], 3)}


def bad_inputs(folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, f"{name}.nii.gz") for name in BAD_INPUTS}
    with open(os.path.join(FLAGS.data_dir, "images", "sub-06.nii.gz"), "rb") as f:
        whole = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(whole[:len(whole) // 2])
    native = nib.load(os.path.join(FLAGS.data_dir, "native", "images", "sub-06.mgz"))
    nib.save(nib.Nifti1Image(np.asarray(native.dataobj)[:, :, native.shape[2] // 2],
                             native.affine), paths["flat"])
    z, y, x = np.ogrid[-128:128, -128:128, -128:128]
    ball = z * z + y * y + x * x <= 20 ** 2
    values = np.random.default_rng(0).integers(100, 200, ball.shape, dtype=np.uint8) * ball
    nib.save(nib.Nifti1Image(values, np.eye(4)), paths["not_brain"])
    return paths


def refusal_part(cohort: Cohort) -> dict:
    """predict.py on each bad input (``BAD_INPUTS``), and Python importing TensorFlow alone."""
    rows = []
    for name, path in bad_inputs(os.path.join(cohort.work, "inputs", "bad")).items():
        output_dir = os.path.join(cohort.work, "refusal", name)
        run, argv = cohort.predict(path, output_dir, f"refusal_{name}", check=False)
        lines = harness.log_lines(run["stderr"])
        rows.append({"input": name, "what": BAD_INPUTS[name], **run,
                     "message": lines[-1] if lines else "", "stderr_lines": len(lines),
                     "outputs_left": sorted(os.listdir(output_dir))
                     if os.path.isdir(output_dir) else None})
        if FLAGS.trace:
            shutil.rmtree(output_dir, ignore_errors=True)
            opened = harness.files_opened(argv, FLAGS.model_dir, os.path.join(
                cohort.logs, f"refusal_{name}.strace"), env=cohort.env, cwd=harness.ROOT)
            rows[-1].update(run_files_opened=opened, model_loaded=None if opened is None else any(
                os.path.basename(p) in ("saved_model.pb", "generator.h5")
                or p.endswith(".index") or ".data-" in p for p in opened))
        print(f"refusal {name}: exit {run['returncode']} after {run['wall_s']:.1f} s: "
              f"{rows[-1]['message']}", flush=True)
    floor = cohort.measure([sys.executable, "-c", "from ltnet_tf import compat; import "
                            "tensorflow"], "import_tensorflow")
    return {"inputs": BAD_INPUTS, "runs": rows, "import_tensorflow": {k: floor[k] for k in (
        "command", "returncode", "wall_s", "cpu_s", "peak_rss_mib", "load_start", "load_end")}}


# ------------------------------------------------------------------------------- cohort.md
def _load(run: dict) -> str:
    return f"{run['load_start'][0]:.2f} → {run['load_end'][0]:.2f}"


def _processes(runs: dict, names: dict) -> list:
    """The table of the runs' processes, then the predict.py command of each."""
    return [*table(["run", "scans", "wall s (start to exit)", "CPU s", "peak RSS MiB",
                    "load (1 min) start → end", "exit"],
                   [[names.get(k, k), r["scans"] if isinstance(r["scans"], int)
                     else len(r["scans"]), f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                     f"{r['peak_rss_mib']:.0f}", _load(r), r["returncode"]]
                    for k, r in runs.items()]),
            "", *[f"- {names.get(k, k)}: `{r['command']}`" for k, r in runs.items()]]


def stages_section(part: dict) -> list:
    runs = part["runs"]
    stages = [s for s in STAGE_ORDER if any(s in r["warm"] or s in r["first"]
                                            for r in runs.values())]
    stages += sorted({s for r in runs.values() for s in r["warm"]} - set(stages))
    return ["## Seconds per scan, per stage", "",
            f"Cohort: {', '.join(part['cohort'])} (native 256³ scans and renamed copies), one "
            f"fresh predict.py process per run. First: the first scan; warm: the mean of the "
            f"{len(part['cohort']) - 1} others. From each run's prediction.json; total is a "
            "scan's time on the way (the next scan is read in the background while one is "
            "segmented: only the wait counts).", "",
            *table(["stage", *(f"{RUNS.get(k, k)} {when}" for k in runs
                               for when in ("first", "warm"))],
                   [[s, *(harness.cell(r[when].get(s), ".2f") for r in runs.values()
                          for when in ("first", "warm"))] for s in stages]),
            "", "The processes:", "", *_processes(runs, RUNS)]


def memory_section(part: dict) -> list:
    runs = part["runs"]
    names = {key: f"{run['scans']} scans" for key, run in runs.items()}
    ratio, target = part["peak_rss_ratio"], part["target_ratio"]
    return ["## Memory: many scans in one process", "",
            f"predict.py (--noqc) on copies of {part['scan']}, each run in a fresh process.", "",
            *table(["run", "first scan s", "warm s/scan", "slowest warm s", "last scan s"],
                   [[names[k], f"{r['first']['total']:.2f}",
                     harness.cell(r["warm"].get("total"), ".2f"),
                     harness.cell(max(r["totals"][1:]) if r["totals"][1:] else None, ".2f"),
                     f"{r['totals'][-1]:.2f}"] for k, r in runs.items()]), "",
            f"Peak RSS {names['many']} / {names['few']}: **{ratio:.3f}** (target: at most "
            f"{target:.2f}: {'met' if ratio <= target else 'NOT met'}).", "",
            *_processes(runs, names)]


def refusal_section(part: dict) -> list:
    floor = part.get("import_tensorflow")
    return ["## Refusal of bad inputs", "",
            "predict.py --model_dir RUN --images BAD --output_dir OUT, as a user runs it. "
            "Seconds from start to exit; model loaded: whether any weights or graph file of the "
            "run folder was opened (strace, in a second run).", "",
            *[f"- {name}: {what}" for name, what in part["inputs"].items()], "", *table(
                ["input", "exit", "seconds", "peak RSS MiB", "model loaded", "stderr lines",
                 "outputs left", "last line on stderr"],
                [[r["input"] + (f" ({r['version']})" if "version" in r else ""),
                  r["returncode"], f"{r['wall_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
                  {None: "not checked", True: "yes", False: "no"}[r.get("model_loaded")],
                  r["stderr_lines"],
                  "no folder" if r["outputs_left"] is None else len(r["outputs_left"]),
                  f"`{r['message'].replace('|', '/')}`"] for r in part["runs"]]),
            *(["", f"Python importing TensorFlow and exiting (`{floor['command']}`): "
               f"{floor['wall_s']:.1f} s, {floor['peak_rss_mib']:.0f} MiB, load "
               f"{_load(floor)}."] if floor else [])]


def markdown(results: dict) -> list:
    m = results["machine"]
    lines = ["# Cohort throughput of predict.py", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, TensorFlow "
             f"{m['tensorflow']}. Every figure comes from predict.py run as a user runs it, in a "
             "fresh process, one at a time; the load average at the start and end of each run "
             "says how quiet the machine was.", ""]
    for name, section in (("stages", stages_section), ("memory", memory_section),
                          ("refusal", refusal_section)):
        if name in results:
            part = results[name]
            lines += [*section(part), "", f"Benchmark: `{part['command']}` at "
                      f"`{part['git_commit'][:12]}`.", ""]
    return lines


def main(argv):
    del argv
    if set(FLAGS.parts) - set(PARTS):
        raise SystemExit(f"unknown parts: {', '.join(sorted(set(FLAGS.parts) - set(PARTS)))}")
    cohort = Cohort()
    path = os.path.join(FLAGS.results_dir, "cohort.json")
    results = {**harness.read_json(path, FLAGS.merge), "command": cohort.roles(
        harness.command_line()), "git_commit": harness.git_commit(), "machine": harness.machine()}
    config = harness.read_json(os.path.join(FLAGS.model_dir, "config.json"))
    provenance = {"command": results["command"], "git_commit": results["git_commit"],
                  "run_folder": {"path": "RUN", **{k: config[k] for k in (
                      "steps", "downsample", "atlas_shape")}}}
    for part in (p for p in PARTS if p in FLAGS.parts):
        figures = {"stages": stages_part, "memory": memory_part,
                   "refusal": refusal_part}[part](cohort)
        results[part] = {**provenance, **json.loads(cohort.roles(json.dumps(figures)))}
        # after each part: a long run leaves what it has
        harness.write_results(results, markdown, os.path.join(FLAGS.results_dir, "cohort"))


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    app.run(main)
