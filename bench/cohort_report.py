"""cohort.md: the tables of ``bench/cohort.py``'s results (stages, Dice, memory, refusal)."""
from __future__ import annotations

# Stages in the order a scan meets them; any other a version records follows.
STAGE_ORDER = ("read", "wait", "align", "network", "refine", "labels", "network_and_labels",
               "write", "scores", "qc", "total")
RUNS = {"before": "before", "after": "after (--noqc)", "after_qc": "after (QC on)"}


def _seconds(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _dice(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def _load(run: dict) -> str:
    return f"{run['load_start'][0]:.2f} → {run['load_end'][0]:.2f}"


def _process_table(runs: dict, names: dict) -> list:
    lines = ["| run | scans | wall s (start to exit) | CPU s | peak RSS MiB | load (1 min) "
             "start → end | exit |", "|---|---|---|---|---|---|---|"]
    for key, run in runs.items():
        scans = run["scans"] if isinstance(run["scans"], int) else len(run["scans"])
        lines.append(f"| {names.get(key, key)} | {scans} | {run['wall_s']:.1f} | "
                     f"{run['cpu_s']:.1f} | {run['peak_rss_mib']:.0f} | {_load(run)} | "
                     f"{run['returncode']} |")
    return lines


def _commands(part: dict, runs: dict, names: dict) -> list:
    lines = ["", f"Benchmark: `{part['command']}` at `{part['git_commit'][:12]}`"
             + (f", before = `{part['before_commit'][:12]}`" if part.get("before_commit")
                else "") + ".", ""]
    lines += [f"- {names.get(key, key)}: `{run['command']}`" for key, run in runs.items()]
    return lines


def stages_section(part: dict) -> list:
    runs = part["runs"]
    stages = [s for s in STAGE_ORDER if any(s in r["warm"] or s in r["first"]
                                            for r in runs.values())]
    stages += sorted({s for r in runs.values() for s in r["warm"]} - set(stages))
    ratio = part["warm_ratio_after_over_before"]
    lines = ["## Seconds per scan, per stage", "",
             f"Cohort: {', '.join(part['cohort'])} (native 256³ scans and renamed copies), one "
             f"fresh predict.py process per version. First: the first scan; warm: the mean of "
             f"the {len(part['cohort']) - 1} others. From each run's prediction.json; total is "
             "a scan's time on the way (the old code reads the scan inside it; the new one "
             "reads the next scan in the background while one is segmented and counts only "
             "the wait; the old code records align, network, refine, labels and total only).",
             "",
             "| stage | before first | before warm | after first | after warm | "
             "warm after / before | after+QC first | after+QC warm |",
             "|---|---|---|---|---|---|---|---|"]
    for stage in stages:
        cells = []
        for key in ("before", "after"):
            cells += [_seconds(runs[key]["first"].get(stage)),
                      _seconds(runs[key]["warm"].get(stage))]
        cells.append(f"{ratio[stage]:.2f}" if stage in ratio else "–")
        cells += [_seconds(runs["after_qc"]["first"].get(stage)),
                  _seconds(runs["after_qc"]["warm"].get(stage))]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "The processes:", "", *_process_table(runs, RUNS)]
    before, after = runs["before"], runs["after"]
    lines += ["", f"Wall time after / before: {after['wall_s'] / before['wall_s']:.2f}; peak "
              f"RSS after / before: {after['peak_rss_mib'] / before['peak_rss_mib']:.2f}.", ""]
    return lines + _differences(part["voxels_differing"]) + _commands(part, runs, RUNS)


def _differences(voxels: dict) -> list:
    """Voxels labelled differently: the current code in two processes (with and without QC
    pictures, which are drawn after the segmentation) is the run-to-run variation."""
    lines = ["Voxels labelled differently (of those labelled in either): after vs after+QC is "
             "the same code in two processes (the QC picture is drawn after the segmentation), "
             "so it is the run-to-run variation; before vs after is the change.", "",
             "| scan | after vs after+QC | before vs after |", "|---|---|---|"]
    for scan, same in voxels["after_vs_after_qc"].items():
        change = voxels["before_vs_after"][scan]
        lines.append(f"| {scan} | {same['differ']} of {same['labelled']} | "
                     f"{change['differ']} of {change['labelled']} |")
    return lines


def dice_section(part: dict) -> list:
    lines = ["## Dice at equal settings", "",
             f"Mean Dice over the {len(part['labels'])} benchmark structures on each scan's own "
             "grid, mean over subjects; the current code with --noqc (its QC pictures are drawn "
             "after the segmentation).", "",
             "| set | subjects | before | after | after − before |", "|---|---|---|---|---|"]
    for name, figures in part["sets"].items():
        difference = figures["difference"]
        lines.append(f"| {name} | {', '.join(figures['subjects'])} | "
                     f"{_dice(figures['before']['mean_dice'])} | "
                     f"{_dice(figures['after']['mean_dice'])} | "
                     f"{'–' if difference is None else f'{difference:+.4f}'} |")
    lines += ["", "| set | subject | before | after | after − before |", "|---|---|---|---|---|"]
    for name, figures in part["sets"].items():
        for subject in figures["subjects"]:
            a, b = (figures[label]["per_subject"][subject] for label in ("before", "after"))
            change = "–" if a is None or b is None else f"{b - a:+.4f}"
            lines.append(f"| {name} | {subject} | {_dice(a)} | {_dice(b)} | {change} |")
    lines += ["", "Segmented by:", ""]
    lines += [f"- {name} {label}: `{figures[label]['segmented_by']}`"
              for name, figures in part["sets"].items() for label in ("before", "after")]
    return lines


def memory_section(part: dict) -> list:
    runs = part["runs"]
    names = {key: f"{run['scans']} scans" for key, run in runs.items()}
    ratio, target = part["peak_rss_ratio"], part["target_ratio"]
    lines = ["## Memory: many scans in one process", "",
             f"The current predict.py (--noqc) on copies of {part['scan']}, each run in a fresh "
             "process.", "", *_process_table(runs, names), "",
             f"Peak RSS {names['many']} / {names['few']}: **{ratio:.3f}** (target: at most "
             f"{target:.2f}: {'met' if ratio <= target else 'NOT met'}).", "",
             "| run | first scan s | warm s/scan | slowest warm s | last scan s |",
             "|---|---|---|---|---|"]
    for key, run in runs.items():
        warm = run["totals"][1:]
        lines.append(f"| {names[key]} | {run['first']['total']:.2f} | "
                     f"{_seconds(run['warm'].get('total'))} | "
                     f"{_seconds(max(warm) if warm else None)} | {run['totals'][-1]:.2f} |")
    return lines + _commands(part, runs, names)


def refusal_section(part: dict) -> list:
    lines = ["## Refusal of bad inputs", "",
             "predict.py --model_dir RUN --images BAD --output_dir OUT, as a user runs it. "
             "Seconds from start to exit; model loaded: whether any weights or graph file of the "
             "run folder was opened (strace, in a second run).", ""]
    lines += [f"- {name}: {what}" for name, what in part["inputs"].items()]
    lines += ["", "| input | version | exit | seconds | peak RSS MiB | model loaded | stderr "
              "lines | outputs left | last line on stderr |", "|---" * 9 + "|"]
    for run in part["runs"]:
        loaded = run.get("model_loaded")
        left = run["outputs_left"]
        lines.append(f"| {run['input']} | {run['version']} | {run['returncode']} | "
                     f"{run['wall_s']:.1f} | {run['peak_rss_mib']:.0f} | "
                     f"{'not checked' if loaded is None else ('yes' if loaded else 'no')} | "
                     f"{run['stderr_lines']} | "
                     f"{'no folder' if left is None else len(left)} | "
                     f"`{run['message'].replace('|', '/')}` |")
    floor = part.get("import_tensorflow")
    if floor:
        lines += ["", f"Python importing TensorFlow and exiting (`{floor['command']}`): "
                  f"{floor['wall_s']:.1f} s, {floor['peak_rss_mib']:.0f} MiB, load "
                  f"{_load(floor)}."]
    lines += ["", f"Benchmark: `{part['command']}` at `{part['git_commit'][:12]}`, before = "
              f"`{part['before_commit'][:12]}`."]
    return lines


def markdown(results: dict) -> list:
    """The lines of cohort.md for the parts present in ``results``."""
    machine = results["machine"]
    lines = ["# Cohort throughput of predict.py, before and after", "",
             f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, Python {machine['python']}, "
             f"TensorFlow {machine['tensorflow']}. Every figure comes from predict.py run as a "
             "user runs it, in a fresh process, one at a time; the load average at the start "
             "and end of each run says how quiet the machine was.", ""]
    sections = {"stages": stages_section, "dice": dice_section, "memory": memory_section,
                "refusal": refusal_section}
    for name, section in sections.items():
        if name in results:
            lines += [*section(results[name]), ""]
    return lines
