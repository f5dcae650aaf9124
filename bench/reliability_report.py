"""bench/results/reliability.md from reliability.json (``python -m bench.reliability`` writes
both)."""
from __future__ import annotations

from bench.harness import table


def _kill_moments(kills: list) -> list:
    """Where the kills landed: how many of the cohort's scans were finished at each kill, and
    how many the killed run itself had finished (0: killed while starting or in its first scan)."""
    if not kills or "scans_finished_at_kill" not in kills[0]:
        return []
    at = sorted(k["scans_finished_at_kill"] for k in kills)
    own = [k["scans_finished_at_kill"] - k["scans_finished_before"] for k in kills]
    return [f"Scans of the cohort finished at each kill: {', '.join(map(str, at))}; kills after "
            f"the killed run itself had finished at least one scan: {sum(o > 0 for o in own)} of "
            f"{len(kills)}.", ""]


def _determinism(det: dict) -> list:
    same, machine = det["same_scan_voxels_differ"], det["machine_threads_voxels_differ"]
    warm = det["warm_seconds_per_scan"]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return [
        "## Same scan, same answer (voxels that differ; 0 = bit-identical)", "",
        f"Cohort: {det['cohort']}.", "",
        *table(["comparison", "deterministic (default)", "`LTNET_TF_THREADS=machine`"], [
            ["within a run (first vs later copy of one scan, two runs)", same["within_run"],
             machine["within_run"]],
            ["across runs (two processes)", same["across_runs"], machine["across_runs"]],
            ["1 core (`taskset -c 0`) vs 2 cores", same["one_vs_two_threads"], ""],
            ["`--shard 1/2` + `2/2` in one folder + merge vs one run", same["across_shards"],
             ""]]), "",
        "volumes.csv byte-identical: " + ", ".join(
            f"{k.replace('_', ' ')} {'yes' if v else 'NO'}"
            for k, v in det["volumes_csv_identical"].items()) + ".", "",
        f"**determinism_time_ratio {det['determinism_time_ratio']}**: warm scans' mean seconds, "
        f"deterministic {mean(warm['deterministic']):.2f} s over machine thread counts "
        f"{mean(warm['machine']):.2f} s (runs alternating deterministic and machine, "
        f"{len(warm['deterministic'])} + {len(warm['machine'])} warm scans).", ""]


def _window(reference: dict) -> str:
    if "startup_s" not in reference:  # results of the version that drew from half the run
        return "between 1 s and half that time (at most 120 s)"
    return (f"between 1 s and 1.1 x the time the killed run had left (start-up "
            f"{reference['startup_s']} s + {reference['seconds_per_scan']} s per unfinished scan, "
            f"as in the uninterrupted run)")


def _killed(killed: dict) -> list:
    signals = {}
    for kill in killed["kills"]:
        signals[kill["signal"]] = signals.get(kill["signal"], 0) + 1
    codes = sorted({(k["signal"], k["returncode"]) for k in killed["kills"]})
    return [
        "## Killed runs", "",
        f"Cohort: {killed['cohort']}. An uninterrupted reference run took "
        f"{killed['reference_run']['seconds']} s; then {killed['killed']} runs of the same "
        f"command were stopped at a random moment {_window(killed['reference_run'])} "
        f"({', '.join(f'{n} {s}' for s, n in sorted(signals.items()))}), each followed by the same "
        f"command, over {len(killed['rounds'])} cohort folders.", "",
        *_kill_moments(killed["kills"]),
        *table(["", ""], [
            ["scans lost (missing from volumes.csv, dice.csv, prediction.json or report.html)",
             killed["scans_lost"]],
            ["scans duplicated there", killed["scans_duplicated"]],
            ["partial files (final names that do not read back after a kill; temporary files "
             "left after the re-run)", killed["partial_files"]],
            ["voxels differing from the uninterrupted run",
             killed["voxels_differ_from_uninterrupted_run"]],
            ["volumes.csv equal to the uninterrupted run's",
             all(r["volumes_csv_equal_reference"] for r in killed["rounds"])],
            ["exit codes (signal, code)", ", ".join(f"{s} {c}" for s, c in codes)]]), ""]


def markdown(result: dict) -> list:
    concurrent, disk = result["concurrent_writers"], result["disk_full"]
    return [
        "# Reliability of predict.py: same scan, same answer; killed runs; writers; full disk", "",
        f"Command `python -m bench.reliability` ({result['machine']}); per part the commit and "
        f"minutes: " + "; ".join(f"{part} `{commit}` {result['minutes'].get(part)} min"
                                 for part, commit in result["commits"].items())
        + f". Load average {result['load_start'][0]:.1f} at the start of the last invocation "
        f"(`{result['command']}`), {result['load_end'][0]:.1f} at its end.", "",
        *_determinism(result["determinism"]), *_killed(result["killed_runs"]),
        "## Two writers on one folder", "",
        f"Two whole-cohort runs started 2 s apart on one folder: the first exited "
        f"{concurrent['first']['returncode']} with {concurrent['first']['scans_written']} "
        f"segmentations; the second exited {concurrent['second']['returncode']} in "
        f"{concurrent['second']['seconds']} s with: `{concurrent['second']['last_line']}`. "
        f"Unreadable files afterwards: {len(concurrent['unreadable_final_files'])}.", "",
        "## Full disk", "",
        f"{disk['limit']} over a folder holding a finished run: exit {disk['run']['returncode']} "
        f"with `{disk['run']['last_line']}`; {len(disk['earlier_files_changed'])} of "
        f"{disk['earlier_files']} earlier files changed, {len(disk['temporary_files_left'])} "
        f"temporary files left. The same command without the limit then exited "
        f"{disk['rerun_without_limit']['returncode']} with {disk['segmentations_after_rerun']} "
        f"segmentations."]
