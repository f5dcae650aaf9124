"""One scan from process start to exit, a busy folder refused, N jobs, training's start-up: predict.py
and train.py run as a user runs them, the code before a change and after it, in one run.

    startup   one native 256³ scan (native/images/sub-06.mgz) with the atlas: ``predict.py`` from
              process start to exit, per stage (``bench/cohort_timeline.py`` records the same
              events in any version of the code), by the code of --before (its own git worktree)
              and the current code, the latter with an empty XLA cache (a machine's first run)
              and with the cache that run left (every later run); --rounds rounds, interleaved;
              the versions' segmentations and volumes.csv compared byte for byte
    refusal   a second predict.py (before, after) on a folder a first one (current code) is writing
              the 10 scans of ``jobs`` to: seconds from its start to its exit, and its last line
    jobs      ``--jobs 1`` and ``--jobs 2`` (current code) on 10 native scans (sub-01..07 on their
              256³ grids, MICCAI 2012 1000-1002 on theirs): wall and CPU seconds, and every output
              compared byte for byte (prediction.json less its seconds)
    training  ``train.py --profile cpu`` on the atlas and sub-01..03, 3 steps, no export: seconds
              from process start to the end of the first step, before and after (--rounds)

CPU seconds are the process's and its jobs' (``os.wait4``). The machine may be shared: the load
averages at the start and end of every run are recorded.

    python -m bench.cohort                               # ~20 min on 2 CPU cores
    python -m bench.cohort --rounds 1 --parts startup    # a smoke test

Writes bench/results/cohort.json and cohort.md (``bench.cohort_report``).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags

from bench import cohort_report, harness
from bench.harness import ROOT

FLAGS = flags.FLAGS
PARTS = ("startup", "refusal", "jobs", "training")
harness.define_flags("cohort", merge=True)
flags.DEFINE_list("parts", list(PARTS), "Parts to run.")
flags.DEFINE_string("before", None, "The commit compared against (default: where this branch "
                    "left main, git merge-base HEAD main).")
flags.DEFINE_integer("rounds", 3, "Rounds of the start-up and training runs (medians).",
                     lower_bound=1)
flags.DEFINE_string("scan", "sub-06", "Native scan of the start-up part (native/images/).")
flags.DEFINE_float("settle_seconds", 3.0, "Rest before each measured run.", lower_bound=0)

TIMELINE = os.path.join(ROOT, "bench", "cohort_timeline.py")
JOBS_NATIVE = ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05", "sub-06", "sub-07")
JOBS_MICCAI = ("1000", "1001", "1002")


# ------------------------------------------------------------------------------- running
class Version:
    """A checkout whose scripts run with its own ltnet_tf (PYTHONPATH) and this Python."""

    def __init__(self, name: str, root: str, commit: str):
        self.name, self.root, self.commit = name, root, commit

    def argv(self, script: str, timeline: str, *arguments) -> list:
        return [sys.executable, TIMELINE, timeline, os.path.join(self.root, script),
                *map(str, arguments)]

    def env(self, cache: str) -> dict:
        environ = {k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}
        return dict(environ, PYTHONPATH=self.root, LTNET_CACHE_DIR=cache)


def measured(argv: list, env: dict, log: str) -> dict:
    """Run ``argv`` to its end: wall seconds from just before the process starts to its exit,
    CPU seconds (its own and its jobs'), peak resident memory, the load before and after."""
    time.sleep(FLAGS.settle_seconds)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    load_start = os.getloadavg()[0]
    with open(log, "w") as out:
        start = time.time()
        process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        end = time.time()
    process.returncode = os.waitstatus_to_exitcode(status)
    with open(log) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return {"start": start, "end": end, "wall_seconds": round(end - start, 2),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "exit": process.returncode,
            "last_line": lines[-1] if lines else "",
            "load_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)]}


STAGES = ("python start", "imports, flags", "lock, atlas, checks", "model, predictor",
          "to the first scan", "first scan", "tables, report", "exit")


def predict_stages(run: dict, timeline: str) -> dict:
    """Wall and CPU seconds per stage of a one-scan predict.py, from process start to exit:
    {'wall': {stage: s}, 'cpu': {stage: s}}, the stages bounded by the timeline's events."""
    with open(timeline) as f:
        recorded = json.load(f)
    events = recorded["events"]

    def at(name, what, last=False):
        found = [(t, cpu) for n, w, t, cpu in events if n == name and w == what]
        return found[-1] if last else found[0]

    bounds = [(run["start"], 0.0), (recorded["start"], recorded["start_cpu"]),
              at("predict_files", "begin"), at("check_inputs", "end", last=True),
              at("predictor", "end", last=True), at("scan", "begin"), at("scan", "end", True),
              at("predict_files", "end", last=True), (run["end"], run["cpu_seconds"])]
    found = {"wall": {}, "cpu": {}}
    for stage, (start, end) in zip(STAGES, zip(bounds, bounds[1:])):
        found["wall"][stage] = round(end[0] - start[0], 2)
        found["cpu"][stage] = round(end[1] - start[1], 2)
    found["wall"]["total"], found["cpu"]["total"] = run["wall_seconds"], run["cpu_seconds"]
    tensorflow = at("import_tensorflow", "end")[0] - at("import_tensorflow", "begin")[0]
    found["wall"]["import tensorflow (within imports)"] = round(tensorflow, 2)
    return found


def scan_stages(output: str, scan: str) -> dict:
    with open(os.path.join(output, "prediction.json")) as f:
        return json.load(f)["scans"][scan]["seconds"]


# ------------------------------------------------------------------------------- parts
def startup(context) -> dict:
    """The one-scan runs of every version, interleaved by round."""
    data = FLAGS.data_dir
    atlas = ["--atlas", os.path.join(data, "atlas.nii.gz"),
             "--atlas_labels", os.path.join(data, "atlas_labels.nii.gz")]
    scan = os.path.join(data, "native", "images", f"{FLAGS.scan}.mgz")
    runs = {"before": [], "after_cold_cache": [], "after_warm_cache": []}
    for round_number in range(FLAGS.rounds):
        cache = os.path.join(context.work, "startup", f"cache_{round_number}")
        shutil.rmtree(cache, ignore_errors=True)
        for name in runs:
            version = context.before if name == "before" else context.after
            output = os.path.join(context.work, "startup", f"{name}_{round_number}")
            shutil.rmtree(output, ignore_errors=True)
            timeline = output + ".timeline.json"
            argv = version.argv("predict.py", timeline, *atlas, "--images", scan,
                                "--output_dir", output)
            run = measured(argv, version.env(cache), output + ".log")
            if run["exit"] != 0:
                raise SystemExit(f"{name}: exit {run['exit']}: {run['last_line']}")
            run.update(stages=predict_stages(run, timeline),
                       scan_stages=scan_stages(output, FLAGS.scan), output=output,
                       command=context.command(version, argv))
            print(f"[startup] round {round_number + 1} {name}: {run['wall_seconds']} s wall, "
                  f"{run['cpu_seconds']} CPU s", flush=True)
            runs[name].append(run)
    return {"scan": FLAGS.scan, "runs": runs,
            "same_outputs": cohort_report.compare_runs(runs, FLAGS.scan)}


def refusal(context) -> dict:
    """A first predict.py writing to a folder, then a second (each version) on the same one."""
    data = FLAGS.data_dir
    folder = os.path.join(context.work, "refusal")
    shutil.rmtree(folder, ignore_errors=True)
    images = _linked(os.path.join(folder, "images"), _cohort_scans(data))
    cache = os.path.join(context.work, "refusal_cache")
    found = {}
    for version in (context.before, context.after):
        output = os.path.join(folder, f"out_{version.name}")
        argv = ["--atlas", os.path.join(data, "atlas.nii.gz"), "--atlas_labels",
                os.path.join(data, "atlas_labels.nii.gz"), "--images", images, "--output_dir",
                output]
        first = subprocess.Popen([sys.executable, os.path.join(context.after.root, "predict.py"),
                                  *argv], env=context.after.env(cache), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_holder(output, first)
        second = [sys.executable, os.path.join(version.root, "predict.py"), *argv]
        run = measured(second, version.env(cache), os.path.join(folder, f"{version.name}.log"))
        still_running = first.poll() is None
        first.send_signal(signal.SIGTERM)
        first.wait()
        run.update(first_still_running=still_running, last_line=context.roles(run["last_line"]),
                   command=context.command(version, second))
        print(f"[refusal] {version.name}: {run['wall_seconds']} s, exit {run['exit']}", flush=True)
        found[version.name] = run
    return {"runs": found}


def jobs(context) -> dict:
    """--jobs 1 and --jobs 2 on the same 10 native scans, the current code."""
    data = FLAGS.data_dir
    folder = os.path.join(context.work, "jobs")
    shutil.rmtree(folder, ignore_errors=True)
    scans = _cohort_scans(data)
    images = _linked(os.path.join(folder, "images"), scans)
    cache = os.path.join(context.work, "jobs_cache")
    runs = {}
    for count in (1, 2):
        output = os.path.join(folder, f"jobs_{count}")
        argv = context.after.argv("predict.py", output + ".timeline.json", "--atlas",
                                  os.path.join(data, "atlas.nii.gz"), "--atlas_labels",
                                  os.path.join(data, "atlas_labels.nii.gz"), "--images", images,
                                  "--output_dir", output, f"--jobs={count}")
        run = measured(argv, context.after.env(cache), output + ".log")
        if run["exit"] != 0:
            raise SystemExit(f"--jobs {count}: exit {run['exit']}: {run['last_line']}")
        with open(os.path.join(output, "prediction.json")) as f:
            run["scan_seconds"] = {n: r["seconds"] for n, r in json.load(f)["scans"].items()}
        run.update(output=output, command=context.command(context.after, argv))
        print(f"[jobs] --jobs {count}: {run['wall_seconds']} s wall, {run['cpu_seconds']} CPU s",
              flush=True)
        runs[count] = run
    return {"scans": [os.path.basename(s) for s in scans], "runs": runs,
            "identical": cohort_report.compare_folders(runs[1]["output"], runs[2]["output"])}


def training(context) -> dict:
    """train.py to its first steps, each version, --rounds rounds interleaved."""
    data = FLAGS.data_dir
    folder = os.path.join(context.work, "training")
    shutil.rmtree(folder, ignore_errors=True)
    unlabeled = _linked(os.path.join(folder, "unlabeled"),
                        [os.path.join(data, "images", f"sub-0{k}.nii.gz") for k in (1, 2, 3)])
    runs = {"before": [], "after": []}
    for round_number in range(FLAGS.rounds):
        for version in (context.before, context.after):
            run_folder = os.path.join(folder, f"{version.name}_{round_number}")
            argv = version.argv("train.py", run_folder + ".timeline.json", "--profile", "cpu",
                                "--atlas", os.path.join(data, "atlas.nii.gz"), "--atlas_labels",
                                os.path.join(data, "atlas_labels.nii.gz"), "--unlabeled",
                                unlabeled, "--model_dir", run_folder, "--steps", 3,
                                "--checkpoint_every", 3, "--noexport")
            run = measured(argv, version.env(os.path.join(folder, "cache")), run_folder + ".log")
            if run["exit"] != 0:
                raise SystemExit(f"train.py ({version.name}): exit {run['exit']}: "
                                 f"{run['last_line']}")
            with open(run_folder + ".timeline.json") as f:
                recorded = json.load(f)
            steps = [(t, cpu) for n, w, t, cpu in recorded["events"]
                     if n == "step" and w == "end"]
            fit = next(t for n, w, t, _ in recorded["events"] if n == "fit" and w == "begin")
            run.update(first_step_end=round(steps[0][0] - run["start"], 2),
                       first_step_end_cpu=round(steps[0][1], 2),
                       fit_to_first_step_end=round(steps[0][0] - fit, 2),
                       later_steps=[round(b[0] - a[0], 2) for a, b in zip(steps, steps[1:])],
                       command=context.command(version, argv))
            print(f"[training] round {round_number + 1} {version.name}: first step done "
                  f"{run['first_step_end']} s after start", flush=True)
            runs[version.name].append(run)
    return {"runs": runs}


def _cohort_scans(data: str) -> list:
    """The 10 native scans of the refusal and jobs parts, each on its own grid."""
    return ([os.path.join(data, "native", "images", f"{s}.mgz") for s in JOBS_NATIVE]
            + [os.path.join(data, "miccai2012", "images", f"{s}.nii.gz") for s in JOBS_MICCAI])


def _linked(folder: str, paths: list) -> str:
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        os.symlink(path, os.path.join(folder, os.path.basename(path)))
    return folder


def _wait_for_holder(output: str, process) -> None:
    """Until the first predict.py holds the folder's lock (the file may name an earlier holder:
    the lock itself is asked)."""
    lock = os.path.join(output, ".predict.lock")
    while process.poll() is None:
        if os.path.isfile(lock):
            with open(lock) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                except BlockingIOError:
                    return
        time.sleep(0.05)
    raise SystemExit("the first predict.py of the refusal part ended before it held the lock")


# ------------------------------------------------------------------------------- the run
class Context:
    """The versions compared and this run's folders; ``roles`` names them in the results."""

    def __init__(self):
        self.work = os.path.abspath(FLAGS.work_dir)
        os.makedirs(self.work, exist_ok=True)
        before = FLAGS.before or _git("merge-base", "HEAD", "main")
        commit = _git("rev-parse", "--verify", f"{before}^{{commit}}")
        path = os.path.join(self.work, f"before-{commit[:10]}")
        if os.path.isdir(path):
            _git("worktree", "remove", "--force", path)
        _git("worktree", "prune")
        _git("worktree", "add", "--detach", path, commit)
        self.before = Version("before", path, commit)
        self.after = Version("after", ROOT, harness.git_commit())

    def close(self) -> None:
        _git("worktree", "remove", "--force", self.before.root)

    def roles(self, text) -> str:
        return harness.portable(text, {self.work: "WORK", self.before.root: "BEFORE",
                                       sys.executable: "python"})

    def command(self, version: Version, argv: list) -> str:
        """The command as a user types it (the timeline wrapper left out), folders by role."""
        script = 3 if argv[1] == TIMELINE else 1
        return self.roles(f"PYTHONPATH={version.root} python "
                          + " ".join(map(str, argv[script:])))


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def main(argv):
    del argv
    unknown = set(FLAGS.parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
    context = Context()
    stem = os.path.join(FLAGS.results_dir, "cohort")
    kept = harness.read_json(stem + ".json", FLAGS.merge)
    results = {**{part: kept[part] for part in PARTS if part in kept},
               **harness.provenance({context.work: "WORK"}), "machine": harness.machine(),
               "before_commit": context.before.commit, "rounds": FLAGS.rounds}
    try:
        for part in PARTS:
            if part in FLAGS.parts:
                results[part] = {**globals()[part](context), "command": results["command"],
                                 "git_commit": results["git_commit"]}
    finally:
        context.close()
    results["load_average_1_5_15min"]["end"] = os.getloadavg()
    results = json.loads(context.roles(json.dumps(results)))  # no folder of this machine
    harness.write_results(results, cohort_report.markdown, stem)


if __name__ == "__main__":
    app.run(main)
