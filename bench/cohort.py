"""Cohort throughput of predict.py as a user runs it, before and after a change, in one run.

    stages    native 256³ scans (sub-06, sub-07 and renamed copies, so several scans are warm
              after the first) segmented by ``predict.py`` in a fresh process each: the code of
              the ``--before`` commit (its own git worktree, its own ltnet_tf), the current code
              with ``--noqc`` (like for like: the old one draws no QC pictures) and with QC.
              Per-stage seconds of every scan from its prediction.json (first scan, mean of the
              warm ones), and of the process: wall time from start to exit, peak resident
              memory (``os.wait4``), CPU seconds, load average at start and end
    dice      both versions' segmentations at equal settings, Dice on the 28 structures of the
              benchmark (``ltnet_tf.io.evaluation``): the native set (sub-06/07, FreeSurfer aseg)
              and MICCAI 2012 subjects on their own grids (manual labels; a separate, untimed
              pass)
    memory    the current predict.py (--noqc) on 2 and on 100 small copies of a native scan
              (2 mm voxels, 128³, NIfTI) in fresh processes: the peak RSS of each, their ratio,
              the warm seconds per scan
    refusal   predict.py of both versions on bad inputs (a truncated .nii.gz, a 2D image, a
              volume with too little tissue for a brain): seconds to exit, exit code, the last
              line on stderr, and which model files of the run folder were opened (strace,
              in a second, untimed run)

Measured runs are sequential, each after the previous one has exited, written files flushed and
a few seconds of rest; TensorFlow is imported once beforehand so no run pays for a cold disk cache.
The measuring process never imports TensorFlow. The lead runs it on a quiet machine:

    python -m bench.cohort --model_dir RUN               # about 15-20 min on 2 CPU cores
    python -m bench.cohort --model_dir RUN --parts memory --memory_scans 4     # a smoke test

Writes bench/results/cohort.json and cohort.md (``bench/cohort_report.py``).
"""
from __future__ import annotations

import os
import sys

from bench.provenance import DATA_DIR, ROOT, command_line, git_commit, portable, write_json

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
from absl import app, flags

from bench import cohort_inputs, cohort_report, measured
from ltnet_tf.io.labels import BENCHMARK_LABELS

PARTS = ("stages", "dice", "memory", "refusal")
# The benchmarks' MICCAI 2012 validation subjects (as bench/anchors.py, which imports TensorFlow).
MICCAI_SUBJECTS = ("1000", "1001", "1002", "1006", "1007", "1008")

flags.DEFINE_string("model_dir", None, "A trained run folder (train.py) both versions use.")
flags.DEFINE_string("before", "188b996", "The commit compared against: its predict.py runs from "
                    "a git worktree of it, with its own ltnet_tf.")
flags.DEFINE_list("parts", list(PARTS), "Parts to run (the others are kept from an existing "
                  "cohort.json with --merge).")
flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_string("work_dir", os.path.join(ROOT, "bench", "scratch", "cohort"),
                    "Scratch: inputs, outputs, logs and the worktree of --before.")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_list("native_scans", ["sub-06", "sub-07"], "Native scans of the stages cohort "
                  "(native/images/<name>.mgz); their labels score the native Dice set.")
flags.DEFINE_integer("copies", 1, "Renamed copies of each native scan in the stages cohort "
                     "(<name>b, <name>c, ...: symlinks), so more scans are warm.", lower_bound=0)
flags.DEFINE_list("miccai_subjects", list(MICCAI_SUBJECTS), "MICCAI 2012 subjects of the "
                  "second Dice set.")
flags.DEFINE_string("memory_scan", "sub-06", "Native scan whose 2 mm copies the memory part "
                    "segments.")
flags.DEFINE_integer("memory_scans", 100, "Scans of the long memory run.", lower_bound=2)
flags.DEFINE_integer("memory_few", 2, "Scans of the short memory run.", lower_bound=1)
flags.DEFINE_float("settle_seconds", 5.0, "Rest before each measured run.", lower_bound=0)
flags.DEFINE_bool("trace", True, "Refusal: also run each under strace to list the run folder's "
                  "files it opened.")
flags.DEFINE_bool("merge", True, "Keep the parts of an existing cohort.json not rerun (each "
                  "part records its own command and commits).")
FLAGS = flags.FLAGS


# ------------------------------------------------------------------------------- versions
@dataclass
class Version:
    """A checkout whose predict.py runs with its own ltnet_tf (PYTHONPATH) and this Python."""
    name: str
    root: str
    commit: str

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": self.root}

    def predict(self, images: str, output_dir: str, *extra) -> list:
        return [sys.executable, os.path.join(self.root, "predict.py"),
                "--model_dir", os.path.abspath(FLAGS.model_dir), "--images", images,
                "--output_dir", output_dir, *extra]


class Context:
    """The versions compared and this run's folders; ``roles`` names them in the results."""

    def __init__(self, need_before: bool):
        self.work = os.path.abspath(FLAGS.work_dir)
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.current = Version("after", ROOT, git_commit())
        self.before = self._before_worktree() if need_before else None
        try:
            for version in filter(None, (self.before, self.current)):
                _check_version(version, self.work)
        except BaseException:
            self.close()
            raise

    def _before_worktree(self) -> Version:
        commit = _git("rev-parse", "--verify", f"{FLAGS.before}^{{commit}}")
        path = os.path.join(self.work, f"before-{commit[:10]}")
        if os.path.isdir(path):
            _git("worktree", "remove", "--force", path)
        _git("worktree", "prune")
        _git("worktree", "add", "--detach", path, commit)
        return Version("before", path, commit)

    def close(self) -> None:
        if self.before is not None:
            _git("worktree", "remove", "--force", self.before.root)

    def roles(self, text) -> str:
        """``text`` with this machine's folders named by role: BEFORE (the worktree of
        --before), WORK (scratch), RUN (the run folder), python, then provenance.portable.
        The longest path first: one folder may hold another."""
        folders = {self.work: "WORK", os.path.abspath(FLAGS.model_dir): "RUN",
                   sys.executable: "python"}
        if self.before is not None:
            folders[self.before.root] = "BEFORE"
        text = str(text)
        for path in sorted(folders, key=len, reverse=True):
            text = text.replace(path, folders[path])
        return portable(text)

    def command(self, version: Version, argv: list) -> str:
        return self.roles(f"PYTHONPATH={version.root} " + shlex.join(argv))


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def _check_version(version: Version, cwd: str) -> None:
    """Compile the version's code once (no run pays for it) and make sure its own ltnet_tf is
    the one imported. Raises SystemExit otherwise."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(version.root,
                                                                           "ltnet_tf")],
                   env=version.env(), check=True, stdout=subprocess.DEVNULL)
    found = subprocess.run([sys.executable, "-c", "import os, ltnet_tf; "
                            "print(os.path.dirname(os.path.abspath(ltnet_tf.__file__)))"],
                           env=version.env(), cwd=cwd, capture_output=True, text=True,
                           check=True).stdout.strip()
    if os.path.realpath(found) != os.path.realpath(os.path.join(version.root, "ltnet_tf")):
        raise SystemExit(f"{version.name}: ltnet_tf imported from {found}, not from "
                         f"{version.root}")


def warm_up(context: Context) -> None:
    """TensorFlow imported once per version and the run folder's files and SavedModel read once,
    untimed, so the first measured run does not pay for a cold disk cache."""
    for version in filter(None, (context.before, context.current)):
        subprocess.run([sys.executable, "-c", "from ltnet_tf import compat; import tensorflow"],
                       env=version.env(), cwd=context.work, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = os.path.abspath(FLAGS.model_dir)
    files = [os.path.join(run, name) for name in os.listdir(run)]
    for folder, _, names in os.walk(os.path.join(run, "saved_model")):
        files += [os.path.join(folder, name) for name in names]
    for path in filter(os.path.isfile, files):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


# ------------------------------------------------------------------------------- one run
def predict_run(context: Context, version: Version, images: str, output_dir: str, log: str,
                extra=(), settle: bool = True) -> dict:
    """predict.py of ``version`` on ``images`` in a fresh process, measured
    (``measured.run_measured``); the output folder is emptied first."""
    shutil.rmtree(output_dir, ignore_errors=True)
    argv = version.predict(images, output_dir, *extra)
    run = measured.run_measured(argv, os.path.join(context.logs, log), env=version.env(),
                                cwd=version.root,
                                settle_seconds=FLAGS.settle_seconds if settle else 0.0)
    run.update(command=context.command(version, argv), commit=version.commit,
               stdout=context.roles(run["stdout"]), stderr=context.roles(run["stderr"]),
               argv=argv, stderr_path=run["stderr"])
    return run


def require_success(run: dict) -> None:
    if run["returncode"] != 0:
        raise SystemExit(f"{run['command']} exited with {run['returncode']}: "
                         f"{measured.last_line(run['stderr_path'])} (log: {run['stderr_path']})")


def scan_seconds(output_dir: str) -> dict:
    """{scan: {stage: seconds}} from a run's prediction.json, in the order segmented."""
    with open(os.path.join(output_dir, "prediction.json")) as f:
        return {name: record["seconds"] for name, record in json.load(f)["scans"].items()}


def first_and_warm(scans: dict) -> dict:
    """The first scan's seconds per stage and the mean of the others' (the warm scans; a stage
    averaged over the warm scans that record it)."""
    names = list(scans)
    warm = {}
    for name in names[1:]:
        for stage, value in scans[name].items():
            warm.setdefault(stage, []).append(value)
    return {"first_scan": names[0], "first": scans[names[0]], "warm_scans": names[1:],
            "warm": {stage: round(float(np.mean(v)), 3) for stage, v in warm.items()}}


def _summary(run: dict) -> dict:
    """A run's figures for the results: without this machine's argv and log path."""
    return {k: v for k, v in run.items() if k not in ("argv", "stderr_path")}


# ------------------------------------------------------------------------------- stages
def stages_part(context: Context) -> dict:
    """The three measured cohort runs (before, after --noqc, after with QC) on the native
    cohort; their per-stage seconds, process figures and the warm ratios after / before."""
    images = cohort_inputs.native_cohort(FLAGS.data_dir, context.work,
                                          FLAGS.native_scans, FLAGS.copies)
    plan = {"before": (context.before, ()), "after": (context.current, ("--noqc",)),
            "after_qc": (context.current, ("--qc",))}
    runs, outputs = {}, {}
    for label, (version, extra) in plan.items():
        outputs[label] = os.path.join(context.work, "stages", label)
        run = predict_run(context, version, images, outputs[label], f"stages_{label}", extra)
        require_success(run)
        scans = scan_seconds(outputs[label])
        runs[label] = {**_summary(run), "version": version.name, "scans": scans,
                       **first_and_warm(scans)}
        print(f"stages {label}: {run['wall_s']:.1f} s wall, {run['peak_rss_mib']:.0f} MiB, "
              f"first {runs[label]['first']['total']:.1f} s, warm "
              f"{runs[label]['warm'].get('total', float('nan')):.1f} s/scan", flush=True)
    before, after = runs["before"]["warm"], runs["after"]["warm"]
    return {"cohort": list(runs["after"]["scans"]), "runs": runs,
            "warm_ratio_after_over_before": {
                stage: round(after[stage] / before[stage], 3) for stage in after
                if stage in before and before[stage] > 0},
            # The same code in two processes: the run-to-run variation, against the change.
            "voxels_differing": {
                "after_vs_after_qc": cohort_inputs.voxels_differing(outputs["after"],
                                                                    outputs["after_qc"]),
                "before_vs_after": cohort_inputs.voxels_differing(outputs["before"],
                                                                  outputs["after"])},
            "outputs": outputs}


# ------------------------------------------------------------------------------- dice
def dice_sets() -> dict:
    """{set: {'images': comma-separated scan paths, 'references': {scan: label path}}}."""
    native, miccai = (os.path.join(FLAGS.data_dir, "native"),
                      os.path.join(FLAGS.data_dir, "miccai2012"))
    return {
        "native": {"images": ",".join(os.path.join(native, "images", f"{s}.mgz")
                                      for s in FLAGS.native_scans),
                   "references": {s: os.path.join(native, "labels", f"{s}.mgz")
                                  for s in FLAGS.native_scans}},
        "miccai2012": {"images": ",".join(os.path.join(miccai, "images", f"{s}.nii.gz")
                                          for s in FLAGS.miccai_subjects),
                       "references": {s: os.path.join(miccai, "labels", f"{s}.nii.gz")
                                      for s in FLAGS.miccai_subjects}}}


def dice_part(context: Context, stages: dict = None) -> dict:
    """Both versions at equal settings on each Dice set; the native set reuses this run's
    stage outputs when there are any."""
    sets = {}
    for set_name, inputs in dice_sets().items():
        figures = {}
        for label, version, extra in (("before", context.before, ()),
                                      ("after", context.current, ("--noqc",))):
            output_dir = (stages or {}).get("outputs", {}).get(label)
            source = "stages part"
            if set_name != "native" or output_dir is None:
                output_dir = os.path.join(context.work, "dice", set_name, label)
                run = predict_run(context, version, inputs["images"], output_dir,
                                  f"dice_{set_name}_{label}", extra, settle=False)
                require_success(run)
                source = run["command"]
            figures[label] = {**cohort_inputs.score(output_dir, inputs["references"]),
                              "segmented_by": source, "commit": version.commit}
        before, after = figures["before"]["mean_dice"], figures["after"]["mean_dice"]
        sets[set_name] = {"subjects": list(inputs["references"]), **figures,
                          "difference": None if None in (before, after) else round(after - before,
                                                                                   4)}
        print(f"dice {set_name}: before {before}, after {after}", flush=True)
    return {"labels": list(BENCHMARK_LABELS), "sets": sets}


# ------------------------------------------------------------------------------- memory
def memory_part(context: Context) -> dict:
    """Peak RSS of the current predict.py (--noqc) on few and on many small scans."""
    few, many = cohort_inputs.small_copies(FLAGS.data_dir, context.work, FLAGS.memory_scan,
                                           (FLAGS.memory_few, FLAGS.memory_scans))
    runs = {}
    for label, folder in (("few", few), ("many", many)):
        output_dir = os.path.join(context.work, "memory", label)
        run = predict_run(context, context.current, folder, output_dir, f"memory_{label}",
                          ("--noqc",))
        require_success(run)
        scans = scan_seconds(output_dir)
        summary = first_and_warm(scans)
        runs[label] = {**_summary(run), "scans": len(scans), "first": summary["first"],
                       "warm": summary["warm"],
                       "totals": [record["total"] for record in scans.values()]}
        print(f"memory {len(scans)} scans: {run['peak_rss_mib']:.0f} MiB, warm "
              f"{summary['warm'].get('total', float('nan')):.2f} s/scan", flush=True)
    return {"scan": f"{FLAGS.memory_scan} resampled to 2 mm voxels, 128³ (NIfTI)",
            "runs": runs, "target_ratio": 1.10,
            "peak_rss_ratio": round(runs["many"]["peak_rss_mib"] / runs["few"]["peak_rss_mib"],
                                    3)}


# ------------------------------------------------------------------------------- refusal
def is_model_file(relative: str) -> bool:
    """A file of the network's weights or graph in a run folder (SavedModel, checkpoint, H5)."""
    name = os.path.basename(relative)
    return name in ("saved_model.pb", "generator.h5") or name.endswith(".index") or (
        ".data-" in name)


def refusal_part(context: Context) -> dict:
    """Each bad input given to each version's predict.py, as a user would."""
    rows = []
    for name, path in cohort_inputs.bad_inputs(FLAGS.data_dir, context.work).items():
        for version in (context.before, context.current):
            output_dir = os.path.join(context.work, "refusal", f"{version.name}_{name}")
            run = predict_run(context, version, path, output_dir,
                              f"refusal_{version.name}_{name}")
            err = run["stderr_path"]
            row = {"input": name, "what": cohort_inputs.BAD_INPUTS[name],
                   "version": version.name,
                   **_summary(run), "message": context.roles(measured.last_line(err)),
                   "stderr_lines": measured.line_count(err),
                   "outputs_left": (sorted(os.listdir(output_dir))
                                    if os.path.isdir(output_dir) else None)}
            if FLAGS.trace:
                shutil.rmtree(output_dir, ignore_errors=True)
                opened = measured.files_opened(
                    run["argv"], FLAGS.model_dir,
                    os.path.join(context.logs, f"refusal_{version.name}_{name}.strace"),
                    env=version.env(), cwd=version.root)
                row.update(run_files_opened=opened, model_loaded=None if opened is None else
                           any(is_model_file(p) for p in opened))
            rows.append(row)
            print(f"refusal {name} {version.name}: exit {run['returncode']} after "
                  f"{run['wall_s']:.1f} s, model loaded: {row.get('model_loaded')}: "
                  f"{row['message']}", flush=True)
    return {"inputs": cohort_inputs.BAD_INPUTS, "runs": rows,
            "import_tensorflow": _import_alone(context)}


def _import_alone(context: Context) -> dict:
    """Python importing TensorFlow and exiting, measured as the refusals are: the floor of any
    command of the package that imports TensorFlow before it checks its inputs."""
    argv = [sys.executable, "-c", "from ltnet_tf import compat; import tensorflow"]
    run = measured.run_measured(argv, os.path.join(context.logs, "import_tensorflow"),
                                env=context.current.env(), cwd=context.current.root,
                                settle_seconds=FLAGS.settle_seconds)
    return {"command": context.command(context.current, argv), "returncode": run["returncode"],
            "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "peak_rss_mib": run["peak_rss_mib"],
            "load_start": run["load_start"], "load_end": run["load_end"]}


# ------------------------------------------------------------------------------- main
def _previous_results() -> dict:
    path = os.path.join(FLAGS.results_dir, "cohort.json")
    if FLAGS.merge and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _run_folder() -> dict:
    with open(os.path.join(FLAGS.model_dir, "config.json")) as f:
        config = json.load(f)
    return {"path": "RUN", "steps": config["steps"], "downsample": config["downsample"],
            "atlas_shape": config["atlas_shape"]}


def main(argv):
    del argv
    parts = [p for p in PARTS if p in FLAGS.parts]
    unknown = set(FLAGS.parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(sorted(unknown))} (one of "
                         f"{', '.join(PARTS)})")
    context = Context(need_before=bool({"stages", "dice", "refusal"} & set(parts)))
    try:
        results = {**_previous_results(), "command": context.roles(command_line()),
                   "git_commit": context.current.commit, "machine": measured.machine()}
        provenance = {"command": results["command"], "git_commit": results["git_commit"],
                      "before_commit": context.before and context.before.commit,
                      "run_folder": _run_folder()}
        warm_up(context)
        stages = None
        for part in parts:
            if part == "stages":
                stages = stages_part(context)
                figures = stages
            elif part == "dice":
                figures = dice_part(context, stages)
            else:
                figures = {"memory": memory_part, "refusal": refusal_part}[part](context)
            results[part] = {**provenance, **json.loads(context.roles(json.dumps(figures)))}
            write_outputs(results)  # after each part, so a long run leaves what it measured
    finally:
        context.close()


def write_outputs(results: dict) -> None:
    write_json(results, os.path.join(FLAGS.results_dir, "cohort.json"))
    with open(os.path.join(FLAGS.results_dir, "cohort.md"), "w") as f:
        f.write("\n".join(cohort_report.markdown(results)) + "\n")


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    app.run(main)
