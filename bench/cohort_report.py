"""What ``bench.cohort`` compares (outputs byte for byte) and writes (cohort.md from cohort.json)."""
from __future__ import annotations

import json
import os
import statistics

import nibabel as nib
import numpy as np

from bench.harness import table

SKIPPED = (".predict-journal", ".predict.lock", "report.html", "prediction.json")


# ------------------------------------------------------------------------------- comparisons
def without_time(record, folder: str):
    """prediction.json's content less what measures time ('seconds'), ``folder`` named OUT."""
    if isinstance(record, dict):
        return {k: without_time(v, folder) for k, v in record.items() if k != "seconds"}
    if isinstance(record, list):
        return [without_time(v, folder) for v in record]
    return record.replace(folder, "OUT") if isinstance(record, str) else record


def compare_folders(first: str, second: str) -> dict:
    """Every output of ``first`` against ``second``'s: files byte for byte (report.html, which
    shows seconds, and predict.py's own bookkeeping aside), prediction.json less its seconds."""
    names = sorted(n for n in os.listdir(first) if not n.startswith(SKIPPED))
    differing = []
    for name in names:
        path = os.path.join(second, name)
        if not os.path.isfile(path) or _bytes(os.path.join(first, name)) != _bytes(path):
            differing.append(name)
    records = []
    for folder in (first, second):
        with open(os.path.join(folder, "prediction.json")) as f:
            records.append(without_time(json.load(f), folder))
    return {"files_compared": len(names), "files_differing": differing,
            "prediction_json_equal_but_seconds": records[0] == records[1]}


def compare_runs(runs: dict, scan: str) -> dict:
    """Each run's segmentation and volumes.csv against the first run's (the code before)."""
    reference = runs["before"][0]["output"]
    found = {}
    for name, repeats in runs.items():
        for number, run in enumerate(repeats):
            a = np.asarray(nib.load(os.path.join(reference, f"{scan}_seg.nii.gz")).dataobj)
            b = np.asarray(nib.load(os.path.join(run["output"], f"{scan}_seg.nii.gz")).dataobj)
            found[f"{name} {number + 1}"] = {
                "voxels_differing": int(np.count_nonzero(a != b)),
                "volumes_csv_identical": _bytes(os.path.join(reference, "volumes.csv"))
                == _bytes(os.path.join(run["output"], "volumes.csv"))}
    return found


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------- cohort.md
def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cell(value, form=".1f"):
    return "–" if value is None else format(value, form)


def startup_lines(part: dict) -> list:
    runs = part["runs"]
    columns = {"before": "before", "after_cold_cache": "after, empty XLA cache",
               "after_warm_cache": "after, XLA cache kept"}
    stages = list(runs["before"][0]["stages"]["wall"])
    rows = [[stage, *(_cell(_median([r["stages"]["wall"].get(stage) for r in runs[name]]), ".2f")
                      for name in columns)] for stage in stages]
    cpu_rows = [[stage, *(_cell(_median([r["stages"]["cpu"].get(stage) for r in runs[name]]),
                                ".2f") for name in columns)]
                for stage in runs["before"][0]["stages"]["cpu"]]
    scan_stages = [s for s in runs["after_warm_cache"][0]["scan_stages"] if s != "total"]
    scan_rows = [[stage, *(_cell(_median([r["scan_stages"].get(stage) for r in runs[name]]),
                                 ".2f") for name in columns)] for stage in scan_stages]
    process_rows = [[columns[name], *(" / ".join(_cell(r[key], form) for r in runs[name])
                                       for key, form in (("wall_seconds", ".1f"),
                                                         ("cpu_seconds", ".1f"),
                                                         ("peak_rss_mib", "d"))),
                     " / ".join(f"{r['load_1min'][0]:.1f}→{r['load_1min'][1]:.1f}"
                                for r in runs[name])] for name in columns]
    same = part["same_outputs"]
    return [
        "## One native scan, process start to exit", "",
        f"`predict.py` with the atlas on native `{part['scan']}.mgz` (256³), one process per run, "
        f"{len(runs['before'])} round(s), each round running the three in turn. Wall seconds per "
        "stage, the median over rounds (stages from `bench/cohort_timeline.py`'s events: the same "
        "in both versions).", "",
        *table(["stage", *columns.values()], rows), "",
        "CPU seconds of the same stages (the process's, every thread; a shared machine inflates "
        "them less than the wall seconds):", "",
        *table(["stage", *columns.values()], cpu_rows), "",
        "Within the first scan (its record in prediction.json; `wait` is the part of `read` on "
        "the way):", "",
        *table(["stage", *columns.values()], scan_rows), "",
        "Every run (rounds separated by /):", "",
        *table(["run", "wall s", "CPU s", "peak RSS MiB", "load (1 min) start→end"],
               process_rows), "",
        "Segmentation and volumes.csv of every run against the first run of the code before: "
        + ("identical in every run (0 voxels differ)."
           if all(v["voxels_differing"] == 0 and v["volumes_csv_identical"]
                  for v in same.values())
           else json.dumps(same)), "",
        *[f"- {columns[name]}: `{runs[name][0]['command']}`" for name in columns], ""]


def refusal_lines(part: dict) -> list:
    runs = part["runs"]
    rows = [[name, _cell(run["wall_seconds"]), run["exit"], run["first_still_running"],
             f"`{run['last_line']}`"] for name, run in runs.items()]
    return ["## A second writer on a busy folder", "",
            "A first `predict.py` (the current code) segments 10 native scans into a folder; once "
            "it holds the folder's lock, a second one, the same command, is started: seconds "
            "from its start to its exit.", "",
            *table(["second writer", "seconds to exit", "exit", "first still writing then",
                    "its last line"], rows), "",
            *[f"- {name}: `{run['command']}`" for name, run in runs.items()], ""]


def per_scan_cost(part: dict, startup=None):
    """(CPU s, wall s) of a warm scan in one job: the --jobs 1 run's CPU less the one-scan run's
    (start-up and first scan, the kept XLA cache), over the other scans; its wall, the median
    total of the scans after the first. None without the start-up part."""
    one = next(run for count, run in part["runs"].items() if str(count) == "1")
    totals = [s["total"] for s in one["scan_seconds"].values()][1:]
    if not startup or not totals:
        return None
    single = _median([r["cpu_seconds"] for r in startup["runs"]["after_warm_cache"]])
    return (one["cpu_seconds"] - single) / len(totals), _median(totals)


def jobs_lines(part: dict, startup=None) -> list:
    runs = part["runs"]
    rows = []
    for count, run in runs.items():
        totals = [s["total"] for s in run["scan_seconds"].values()]
        rows.append([f"--jobs {count}", _cell(run["wall_seconds"]), _cell(run["cpu_seconds"]),
                     run["peak_rss_mib"], _cell(_median(totals), ".2f"),
                     f"{run['load_1min'][0]:.1f}→{run['load_1min'][1]:.1f}"])
    identical = part["identical"]
    verdict = ("identical" if not identical["files_differing"]
               and identical["prediction_json_equal_but_seconds"] else "NOT identical")
    return ["## --jobs 1 and --jobs 2", "",
            f"{len(part['scans'])} native scans ({', '.join(part['scans'])}), the atlas, the "
            "current code.", "",
            *table(["run", "wall s", "CPU s (all jobs)", "peak RSS MiB (largest process)",
                    "median s per scan (its total)", "load (1 min) start→end"], rows), "",
            f"Outputs of --jobs 2 against --jobs 1: {verdict} ({identical['files_compared']} "
            f"files byte for byte, differing: {identical['files_differing'] or 'none'}; "
            f"prediction.json equal but for its seconds: "
            f"{identical['prediction_json_equal_but_seconds']}).", "",
            *_projection(per_scan_cost(part, startup)),
            *[f"- --jobs {count}: `{run['command']}`" for count, run in runs.items()], ""]


def _projection(cost) -> list:
    if cost is None:
        return []
    cpu, wall = cost
    return [f"A warm scan in one job: {cpu:.1f} CPU s (the --jobs 1 run's CPU less the one-scan "
            f"run's, over the scans after the first) in {wall:.1f} s wall (the median of their "
            f"totals): a job keeps {cpu / wall:.1f} cores busy (on a machine shared with other "
            f"work the wall time includes waiting for a core, and this understates it). On a "
            f"machine with 2N free cores (and 3 GB of memory per job), N jobs should segment "
            f"about N times the scans per hour of one, {3600 / wall:.0f} each at this machine's "
            f"speed; on 2 cores they share the same two cores and cannot.", ""]


def training_lines(part: dict) -> list:
    runs = part["runs"]
    rows = [[name, " / ".join(_cell(r["first_step_end"]) for r in repeats),
             " / ".join(_cell(r["first_step_end_cpu"]) for r in repeats),
             " / ".join(_cell(r["fit_to_first_step_end"]) for r in repeats),
             " / ".join(", ".join(_cell(s, ".2f") for s in r["later_steps"]) for r in repeats),
             _cell(_median([r["first_step_end"] for r in repeats]))]
            for name, repeats in runs.items()]
    return ["## Training: start-up before the first step", "",
            "`train.py --profile cpu` on the atlas and sub-01..03 (on the atlas grid), 3 steps, "
            "no export: seconds from process start to the end of the first step (rounds "
            "separated by /).", "",
            *table(["code", "process start → first step done", "its CPU s",
                    "fit() → first step done",
                    "later steps (s each)", "median, start → first step"], rows), "",
            *[f"- {name}: `{repeats[0]['command']}`" for name, repeats in runs.items()], ""]


def markdown(results: dict) -> list:
    machine = results["machine"]
    load = results["load_average_1_5_15min"]
    lines = ["# Start-up, a busy folder, --jobs, training's start-up: before and after", "",
             f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, Python {machine['python']}, "
             f"TensorFlow {machine['tensorflow']}. Load average (1/5/15 min) at the start "
             f"{', '.join(f'{v:.1f}' for v in load['start'])}, at the end "
             f"{', '.join(f'{v:.1f}' for v in load.get('end', []))}: "
             + ("the machine was shared with other jobs, so seconds are upper bounds."
                if max(load["start"][0], *(load.get("end") or [0])[:1]) > 1.5 else
                "a quiet machine."), "",
             f"Benchmark: `{results['command']}` at `{results['git_commit']}`; before = "
             f"`{results['before_commit'][:12]}`. Folders of the machine that ran it: WORK "
             "(scratch), BEFORE (a git worktree of the code before).", ""]
    for part, lines_of in (("startup", startup_lines), ("refusal", refusal_lines),
                           ("jobs", lambda p: jobs_lines(p, results.get("startup"))),
                           ("training", training_lines)):
        if part in results:
            lines += lines_of(results[part])
            if results[part].get("git_commit") != results["git_commit"]:
                lines += [f"(This part: `{results[part]['command']}` at "
                          f"`{results[part]['git_commit']}`.)", ""]
    return lines
