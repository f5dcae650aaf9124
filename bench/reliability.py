"""Same scan, same answer; a killed cohort loses nothing; two writers are refused; a full disk is
one line. ``predict.py`` run as a user runs it (fresh processes, real scans of $LTNET_DATA_DIR).

    determinism   a cohort of 4 scans: native sub-06 twice (two names: the first and a later
                  scan of one process) and aligned sub-06 twice. Voxels that differ between the
                  two copies within a run, between two runs, between ``taskset -c 0`` (1 core)
                  and 2 cores, and between the whole run and ``--shard 1/2`` + ``2/2`` (run side
                  by side in one folder) + ``ltnet-merge``; volumes.csv compared
                  byte for byte. The same with ``LTNET_TF_THREADS=machine`` (TensorFlow's and
                  ITK's own thread counts: the code as it was) for comparison, interleaved with
                  the deterministic runs: ``determinism_time_ratio`` is the warm scans' mean
                  seconds, deterministic over machine
    killed_runs   a cohort of 10 scans (aligned sub-01..07, native sub-05..07), with reference
                  label maps: a reference run uninterrupted, then runs of the same command killed
                  at random moments (SIGKILL, and some SIGTERM / SIGINT) until ``--kills`` kills,
                  each followed by the same command (kill moments uniform from 1 s to 1.1 x the
                  time left for the run: start-up + its unfinished scans, as timed uninterrupted);
                  after every kill no final-named file may fail to read; after each finished run
                  every scan must appear exactly once in volumes.csv, dice.csv, prediction.json and
                  report.html, no temporary file may be left, and the segmentations and
                  volumes.csv must equal the reference run's
    concurrent    two whole-cohort runs started together on one folder: the second is refused
    disk_full     a rerun with other settings under ``ulimit -f`` (segmentations cannot be
                  written): its exit line, then every earlier file compared byte for byte

    python -m bench.reliability                # ~25 min on 2 shared CPU cores
    python -m bench.reliability --kills 3      # a smoke test

Writes bench/results/reliability.json and reliability.md (``bench.reliability_report``). Timings
are from a machine shared with other jobs (the load averages are recorded): the ratio compares
runs interleaved in one session.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from bench import harness, reliability_report
from bench.harness import DATA_DIR, ROOT

FLAGS = flags.FLAGS
PARTS = ("determinism", "concurrent_writers", "disk_full", "killed_runs")
flags.DEFINE_integer("kills", 20, "Runs of the 10-scan cohort killed at random moments.")
flags.DEFINE_integer("timing_rounds", 4, "Determinism: rounds of one deterministic and one "
                     "machine-threads run, interleaved (the time ratio averages their warm scans; "
                     "at least 2).", lower_bound=2)
flags.DEFINE_integer("seed", 0, "Seed of the kill moments and signals.")
flags.DEFINE_list("parts", ["determinism", "concurrent_writers", "disk_full", "killed_runs"],
                  "Parts to run; others are kept from an existing results file.")
flags.DEFINE_string("results", os.path.join(ROOT, "bench", "results", "reliability"),
                    "Results path without extension (.json and .md are written).")

# Kill moments: uniform from 1 s to the time the killed process is expected to need for what is
# left of its cohort (start-up plus the scans not finished yet, from the uninterrupted run), times
# this factor: a kill lands anywhere from start-up to the last scan; some runs finish first and
# close their round (a new cohort folder starts).
KILL_WINDOW = 1.1
ATLAS = ["--atlas", os.path.join(DATA_DIR, "atlas.nii.gz"),
         "--atlas_labels", os.path.join(DATA_DIR, "atlas_labels.nii.gz")]


def predict_argv(images, output, *extra):
    return [sys.executable, os.path.join(ROOT, "predict.py"), *ATLAS, "--images", images,
            "--output_dir", output, *extra]


def environment(**extra):
    return dict(os.environ, PYTHONPATH=ROOT, **extra)


def start(argv) -> subprocess.Popen:
    """predict.py in the background, its stderr kept."""
    return subprocess.Popen(argv, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def run(argv, env=None, prefix=None, preexec=None):
    begin = time.time()
    done = subprocess.run(argv, env=env or environment(), capture_output=True, text=True,
                          preexec_fn=preexec)
    if prefix:
        with open(prefix + ".log", "w") as f:
            f.write(done.stdout + done.stderr)
    return {"returncode": done.returncode, "seconds": round(time.time() - begin, 1),
            "last_line": (done.stderr.strip().splitlines() or [""])[-1]}


def differing_voxels(path_a, path_b) -> int:
    import nibabel as nib
    import numpy as np

    a, b = (np.asarray(nib.load(p).dataobj) for p in (path_a, path_b))
    return int(np.count_nonzero(a != b)) if a.shape == b.shape else int(a.size)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def same_file(folder_a, folder_b, name="volumes.csv") -> bool:
    return digest(os.path.join(folder_a, name)) == digest(os.path.join(folder_b, name))


def segmentations(folder) -> dict:
    return {os.path.basename(p)[:-len("_seg.nii.gz")]: p
            for p in sorted(glob.glob(os.path.join(folder, "*_seg.nii.gz")))}


def compare_runs(folder_a, folder_b) -> int:
    a, b = segmentations(folder_a), segmentations(folder_b)
    assert set(a) == set(b), (folder_a, folder_b)
    return sum(differing_voxels(a[n], b[n]) for n in a)


def warm_seconds(folder) -> list:
    with open(os.path.join(folder, "prediction.json")) as f:
        scans = json.load(f)["scans"]
    return [record["seconds"]["total"] for record in list(scans.values())[1:]]


# ------------------------------------------------------------------------------- determinism
def determinism(work) -> dict:
    scans = os.path.join(work, "four")
    os.makedirs(scans)
    native, aligned = (os.path.join(DATA_DIR, "native", "images", "sub-06.mgz"),
                       os.path.join(DATA_DIR, "images", "sub-06.nii.gz"))
    for name, source in (("n1.mgz", native), ("n2.mgz", native), ("a1.nii.gz", aligned),
                         ("a2.nii.gz", aligned)):
        shutil.copy(source, os.path.join(scans, name))
    out = lambda name: os.path.join(work, name)  # noqa: E731
    runs, rounds = {}, range(1, FLAGS.timing_rounds + 1)
    for name, env in [pair for k in rounds for pair in (
            (f"det{k}", environment()), (f"machine{k}", environment(LTNET_TF_THREADS="machine")))]:
        runs[name] = run(predict_argv(scans, out(name), "--noqc"), env, out(name))
        runs[name]["load"] = os.getloadavg()[0]
    one_core = ["taskset", "-c", "0"] + predict_argv(scans, out("one_core"), "--noqc")
    runs["one_core"] = run(one_core, prefix=out("one_core"))
    shards = [start(predict_argv(scans, out("shards"), "--noqc", f"--shard={k}/2"))
              for k in (1, 2)]
    shard_codes = [p.wait() for p in shards]
    merged = run([sys.executable, "-m", "ltnet_tf.prediction.merge", out("shards")])

    def within(folder):
        s = segmentations(folder)
        return differing_voxels(s["n1"], s["n2"]) + differing_voxels(s["a1"], s["a2"])

    det = [t for k in rounds for t in warm_seconds(out(f"det{k}"))]
    machine = [t for k in rounds for t in warm_seconds(out(f"machine{k}"))]
    return {
        "cohort": "native sub-06 as n1.mgz, n2.mgz; aligned sub-06 as a1.nii.gz, a2.nii.gz",
        "same_scan_voxels_differ": {
            "within_run": within(out("det1")) + within(out("det2")),
            "across_runs": compare_runs(out("det1"), out("det2")),
            "one_vs_two_threads": compare_runs(out("det1"), out("one_core")),
            "across_shards": compare_runs(out("det1"), out("shards"))},
        "volumes_csv_identical": {
            "across_runs": same_file(out("det1"), out("det2")),
            "one_vs_two_threads": same_file(out("det1"), out("one_core")),
            "shards_merged": same_file(out("det1"), out("shards"))},
        "machine_threads_voxels_differ": {
            "within_run": within(out("machine1")) + within(out("machine2")),
            "across_runs": compare_runs(out("machine1"), out("machine2"))},
        "shard_exit_codes": shard_codes, "merge": merged,
        "warm_seconds_per_scan": {"deterministic": det, "machine": machine},
        "determinism_time_ratio": round((sum(det) / len(det)) / (sum(machine) / len(machine)), 3),
        "runs": runs,
    }


# ------------------------------------------------------------------------------- killed runs
def ten_scan_cohort(work) -> tuple:
    """aligned sub-01..07 and sub-01 again as sub-08, native sub-06/07; with their labels."""
    images, labels = os.path.join(work, "ten"), os.path.join(work, "ten_labels")
    copies = [(os.path.join("images", f"sub-0{1 if k == 8 else k}.nii.gz"), f"sub-0{k}.nii.gz")
              for k in range(1, 9)]
    copies += [(os.path.join("native", "images", f"sub-0{k}.mgz"), f"native-0{k}.mgz")
               for k in (6, 7)]
    for folder in (images, labels):
        os.makedirs(folder)
    for source, name in copies:
        shutil.copy(os.path.join(DATA_DIR, source), os.path.join(images, name))
        shutil.copy(os.path.join(DATA_DIR, source.replace("images", "labels")),
                    os.path.join(labels, name))
    return images, labels


def unreadable_final_files(folder) -> list:
    """Final-named outputs that do not read back whole."""
    import nibabel as nib
    import numpy as np

    bad = []
    for path in glob.glob(os.path.join(folder, "*")):
        name = os.path.basename(path)
        try:
            if name.endswith(".nii.gz"):
                np.asarray(nib.load(path).dataobj)
            elif name.endswith(".json"):
                with open(path) as f:
                    json.load(f)
            elif name.endswith(".csv"):
                with open(path) as f:
                    rows = list(csv.reader(f))
                assert rows and all(len(r) == len(rows[0]) for r in rows)
            elif name.endswith(".html"):
                with open(path) as f:
                    assert f.read().rstrip().endswith("</html>")
        except Exception:  # noqa: BLE001
            bad.append(name)
    return bad


def temporary_files(folder) -> list:
    return [os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", ".*.tmp-*"),
                                                          recursive=True)]


def coverage(folder, names) -> dict:
    """How often each scan appears in each table (1 everywhere when nothing was lost or doubled)."""
    counts = {}
    for name in ("volumes.csv", "dice.csv"):
        with open(os.path.join(folder, name)) as f:
            rows = [r[0] for r in list(csv.reader(f))[1:] if name != "dice.csv" or r[1] == "mean"]
        counts[name] = {n: rows.count(n) for n in names}  # dice.csv: each scan's mean row
    with open(os.path.join(folder, "prediction.json")) as f:
        record = json.load(f)
    counts["prediction.json"] = {n: int(n in record["scans"]) for n in names}
    with open(os.path.join(folder, "report.html")) as f:
        page = f.read()
    counts["report.html"] = {n: page.count(f"<h2>{n} ") for n in names}  # one section each
    return counts


def finished_scans(folder) -> int:
    """Scans of a cohort folder with a record (written after their files: finished)."""
    journal = os.path.join(folder, ".predict-journal")
    return len([n for n in os.listdir(journal) if n.endswith(".json")]) if os.path.isdir(
        journal) else 0


def run_timing(folder, seconds: float, scans: int) -> tuple:
    """(start-up s, s per scan) of a finished cohort run that took ``seconds``: per-scan totals
    from its prediction.json, the rest start-up (importing, atlases, tracing)."""
    with open(os.path.join(folder, "prediction.json")) as f:
        totals = [scan["seconds"]["total"] for scan in json.load(f)["scans"].values()]
    per_scan = sum(totals) / max(len(totals), 1)
    return max(seconds - per_scan * scans, 1.0), per_scan


def killed_runs(work, kills: int, seed: int) -> dict:
    images, labels = ten_scan_cohort(work)
    names = sorted(n.split(".")[0] for n in os.listdir(images))
    reference = os.path.join(work, "reference")
    ref = run(predict_argv(images, reference, "--labels", labels), prefix=reference)
    startup_s, per_scan_s = run_timing(reference, ref["seconds"], len(names))
    rng = random.Random(seed)
    kill_log, rounds, round_folder, killed = [], [], None, 0
    while killed < kills:
        if round_folder is None:
            round_folder = os.path.join(work, f"killed{len(rounds)}")
            rounds.append({"folder": os.path.basename(round_folder), "kills": 0})
        signum = rng.choice([signal.SIGKILL] * 4 + [signal.SIGTERM, signal.SIGINT])
        finished_before = finished_scans(round_folder)
        left = startup_s + per_scan_s * (len(names) - finished_before)
        delay = rng.uniform(1.0, left * KILL_WINDOW)
        process = start(predict_argv(images, round_folder, "--labels", labels))
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signum)
            _, err = process.communicate()
            killed += 1
            rounds[-1]["kills"] += 1
            kill_log.append({"after_s": round(delay, 1), "signal": signal.Signals(signum).name,
                             "scans_finished_before": finished_before,
                             "scans_finished_at_kill": finished_scans(round_folder),
                             "returncode": process.returncode,
                             "message": (err.strip().splitlines() or [""])[-1][:200],
                             "unreadable_final_files": unreadable_final_files(round_folder)
                             if os.path.isdir(round_folder) else []})
            continue
        process.communicate()
        rounds[-1].update(_finished_round(round_folder, reference, names, process.returncode))
        round_folder = None
    if round_folder is not None:  # the last kill's cohort: the same command once more
        final = run(predict_argv(images, round_folder, "--labels", labels), prefix=round_folder)
        rounds[-1].update(_finished_round(round_folder, reference, names, final["returncode"]))
    return {"cohort": "aligned sub-01..07 and sub-01 again (as sub-08), native sub-06, sub-07 (as "
                      "native-06, native-07), with their label maps",
            "reference_run": {**ref, "startup_s": round(startup_s, 1),
                              "seconds_per_scan": round(per_scan_s, 2)},
            "kills": kill_log, "rounds": rounds,
            "scans_lost": sum(r["scans_lost"] for r in rounds),
            "scans_duplicated": sum(r["scans_duplicated"] for r in rounds),
            "partial_files": sum(len(k["unreadable_final_files"]) for k in kill_log)
            + sum(len(r["temporary_files_left"]) for r in rounds),
            "voxels_differ_from_uninterrupted_run": sum(r["voxels_differ_from_reference"]
                                                        for r in rounds),
            "killed": killed}


def _finished_round(folder, reference, names, returncode) -> dict:
    flat = [c for counts in coverage(folder, names).values() for c in counts.values()]
    return {"returncode": returncode, "scans_lost": sum(1 for c in flat if c == 0),
            "scans_duplicated": sum(1 for c in flat if c > 1),
            "temporary_files_left": temporary_files(folder),
            "voxels_differ_from_reference": compare_runs(reference, folder),
            "volumes_csv_equal_reference": same_file(folder, reference)}


# ------------------------------------------------------------------------------- writers, disk
def concurrent(work) -> dict:
    scans, folder = os.path.join(work, "four"), os.path.join(work, "concurrent")
    first = start(predict_argv(scans, folder, "--noqc"))
    time.sleep(2.0)
    second = run(predict_argv(scans, folder, "--noqc"))
    first.communicate()
    return {"first": {"returncode": first.returncode,
                      "scans_written": len(segmentations(folder))},
            "second": second, "unreadable_final_files": unreadable_final_files(folder)}


def disk_full(work) -> dict:
    folder = os.path.join(work, "disk_full")
    shutil.copytree(os.path.join(work, "det1"), folder)
    before = {p: digest(p) for p in glob.glob(os.path.join(folder, "**"), recursive=True)
              if os.path.isfile(p) and not p.endswith(".lock")}

    def limit():  # 300 KiB: a segmentation (~540 KB) cannot be written
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, 300 * 1024))

    argv = predict_argv(os.path.join(work, "four"), folder, "--noqc", "--refine_steps=11")
    full = run(argv, preexec=limit)
    changed = [os.path.relpath(p, folder) for p, d in before.items()
               if not os.path.isfile(p) or digest(p) != d]
    again = run(argv)
    return {"limit": "ulimit -f 300 (KiB), rerun with --refine_steps=11 (every scan redone)",
            "run": full, "earlier_files": len(before), "earlier_files_changed": changed,
            "temporary_files_left": temporary_files(folder),
            "rerun_without_limit": again, "segmentations_after_rerun": len(segmentations(folder))}


def main(argv):
    del argv
    with tempfile.TemporaryDirectory(prefix="reliability-") as work:
        result = {}
        if set(FLAGS.parts) != set(PARTS):  # the parts not run now are kept
            result = harness.read_json(FLAGS.results + ".json")
        result.setdefault("commits", {})
        result.setdefault("minutes", {})
        result.update(command=harness.command_line(), load_start=os.getloadavg(),
                      machine=f"{os.cpu_count()} CPU cores")  # the load averages say what else ran
        parts = {"determinism": lambda: determinism(work),
                 "concurrent_writers": lambda: concurrent(work),
                 "disk_full": lambda: disk_full(work),
                 "killed_runs": lambda: killed_runs(work, FLAGS.kills, FLAGS.seed)}
        for name in FLAGS.parts:
            if name in ("concurrent_writers", "disk_full") and "det1" not in os.listdir(work):
                determinism(work)  # they start from its scans and outputs
            part_start = time.time()
            try:
                result[name] = json.loads(harness.portable(json.dumps(parts[name]()),
                                                           {work: "WORK"}))
            except Exception:  # noqa: BLE001  (recorded; the other parts still run)
                import traceback

                result[name] = {"error": traceback.format_exc()}
            result["commits"][name] = harness.git_commit()
            result["minutes"][name] = round((time.time() - part_start) / 60, 1)
            harness.write_json(result, FLAGS.results + ".json")  # what is measured so far
        result["load_end"] = os.getloadavg()
    harness.write_results(result, reliability_report.markdown, FLAGS.results)
    print(json.dumps(result.get("determinism", {}).get("same_scan_voxels_differ")))


if __name__ == "__main__":
    app.run(main)
