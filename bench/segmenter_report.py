"""segmenter.md from segmenter.json (``bench.segmenter``)."""
from __future__ import annotations

from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name

NAMES = {"transfer_1": "label transfer, 1 atlas (predict.py --atlas)",
         "segmenter_1": "segmenter trained from 1 atlas",
         "jlf_5": "5 atlases, joint label fusion (predict.py default)",
         "segmenter_5": "segmenter trained from 5 atlases"}
SETS = {"fstd": "sub-06/07", "miccai": "MICCAI 2012 (6)"}


def _figure(entry, key, digits=3):
    if entry and entry.get("measured") is False:
        return "not measured"
    return "—" if not entry or entry.get(key) is None else f"{entry[key]:.{digits}f}"


def _measured(per: dict, *names) -> bool:
    return all(per.get(n, {}).get("mean_dice") is not None for n in names)


def _loads(values) -> str:
    return "?" if not values else "/".join(f"{v:.1f}" for v in values)


def targets(payload: dict) -> list:
    """[(what, measured, met)] of the targets: +0.02 over transfer_1 at <= its seconds;
    >= jlf_5 at <= 1/3 of its seconds; native CPU <= 2/3 of transfer_1's."""
    rows, sets = [], payload.get("sets", {})
    for key, label in SETS.items():
        per = sets.get(key, {})
        if _measured(per, "segmenter_1", "transfer_1"):
            gain = per["segmenter_1"]["mean_dice"] - per["transfer_1"]["mean_dice"]
            rows.append((f"{label}: segmenter_1 >= transfer_1 + 0.02", f"{gain:+.3f}",
                         gain >= 0.02))
            ratio = per["segmenter_1"]["seconds_per_scan"] / per["transfer_1"]["seconds_per_scan"]
            rows.append((f"{label}: segmenter_1 s/scan <= transfer_1's", f"x{ratio:.2f}",
                         ratio <= 1.0))
        if _measured(per, "segmenter_5", "jlf_5"):
            gain = per["segmenter_5"]["mean_dice"] - per["jlf_5"]["mean_dice"]
            rows.append((f"{label}: segmenter_5 >= jlf_5", f"{gain:+.3f}", gain >= 0.0))
            ratio = per["segmenter_5"]["seconds_per_scan"] / per["jlf_5"]["seconds_per_scan"]
            rows.append((f"{label}: segmenter_5 s/scan <= 1/3 of jlf_5's", f"x{ratio:.2f}",
                         ratio <= 1 / 3))
    native = payload.get("native", {})
    if "segmenter_1" in native and "transfer_1" in native:
        ratio = native["segmenter_1"]["cpu_s"] / native["transfer_1"]["cpu_s"]
        rows.append(("native scan: segmenter_1 CPU s <= 2/3 of transfer_1's", f"x{ratio:.2f}",
                     ratio <= 2 / 3))
    for name, minutes in payload.get("train_minutes", {}).items():
        if minutes is not None:
            rows.append((f"{name}: training <= 60 min", f"{minutes:.1f} min", minutes <= 60))
    return rows


def write_markdown(payload: dict, path: str) -> None:
    lines = ["# A segmenter trained from the label transfer, against the label transfer", ""]
    sets = payload.get("sets", {})
    if sets:
        lines += ["Dice of the 28 structures on the atlas grid; seconds per scan end to end "
                  "(read, segment, write; methods interleaved scan by scan).", "",
                  "| method | " + " | ".join(f"Dice {v} | s/scan" for v in SETS.values()) + " |",
                  "|---|" + "---|---|" * len(SETS)]
        for name, label in NAMES.items():
            if not any(name in per for per in sets.values()):
                continue
            cells = []
            for key in SETS:
                entry = sets.get(key, {}).get(name)
                cells += [_figure(entry, "mean_dice"), _figure(entry, "seconds_per_scan", 2)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    rows = targets(payload)
    if rows:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {what} | {value} | {'yes' if met else '**no**'} |"
                  for what, value, met in rows]
        lines.append("")
    native = payload.get("native")
    if native:
        stages = list(next(iter(native.values()))["stages"])
        lines += ["## A warm native 256³ scan (sub-06, sub-07): CPU seconds per stage", "",
                  "| method | " + " | ".join(stages) + " | **sum CPU s** | wall s |",
                  "|---|" + "---|" * (len(stages) + 2)]
        for name, entry in native.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{entry['stages'][s]['cpu_s']:.2f}" for s in stages)
                + f" | **{entry['cpu_s']:.2f}** | {entry['wall_s']:.2f} |")
        lines.append("")
    if sets:
        lines += ["## Per structure (mean over the set's subjects)", ""]
        for key, label in SETS.items():
            per = sets.get(key, {})
            if not per:
                continue
            names = [n for n in per if per[n].get("per_structure")]
            lines += [f"### {label}", "", "| structure | " + " | ".join(names) + " |",
                      "|---|" + "---|" * len(names)]
            for label_id in BENCHMARK_LABELS:
                structure = structure_name(label_id)
                lines.append(f"| {structure} | " + " | ".join(
                    f"{per[n]['per_structure'][structure]:.3f}" for n in names) + " |")
            lines.append("")
    ceiling = payload.get("ceiling_factor_2")
    if ceiling:
        lines += ["## What half resolution allows", "",
                  "True labels pooled x2 (label fractions on the working grid), read back on the "
                  "full grid:", "", "| subject | interpolated probabilities (the segmenter's "
                  "read-out) | interpolated argmax only |", "|---|---|---|"]
        lines += [f"| {s} | {v['interpolated_probabilities']:.3f} | "
                  f"{v['interpolated_argmax']:.3f} |" for s, v in ceiling.items()]
        lines.append("")
    training = payload.get("training")
    if training:
        lines += ["## Training", ""]
        for name, entry in training.items():
            teacher = entry.get("teacher", {})
            examples = entry.get("examples", {})
            lines.append(
                f"- {name}: {entry.get('train_minutes', 0):.1f} min wall in all (teacher "
                f"{teacher.get('minutes', 0):.1f} min, fitting {entry.get('fit_minutes', 0):.1f} "
                f"min, {entry.get('steps')} steps); teacher atlases "
                f"{', '.join(teacher.get('atlases', []))}"
                + (f" fused by {teacher['fusion']}" if teacher.get("fusion") else "")
                + f"; {len(examples.get('labelled', []))} labelled, "
                f"{len(examples.get('pseudo', []))} pseudo-labelled scans, "
                f"{len(examples.get('shapes', []))} shapes; synthesised share "
                f"{entry['config']['synth_fraction']}")
        lines.append("")
    measured = {}
    for per in [*sets.values(), native or {}]:
        for name, entry in per.items():
            if "command" in entry:
                load = entry.get("load_average_1_5_15min", {})
                measured.setdefault((entry["command"], entry.get("git_commit")), set()).add(
                    f"{name} (load {_loads(load.get('start'))} -> {_loads(load.get('end'))})")
    if measured:
        lines += ["## Runs", ""]
        lines += [f"- `{command}` at `{commit}`: {', '.join(sorted(names))}"
                  for (command, commit), names in measured.items()]
        lines.append("")
    load = payload.get("load_average_1_5_15min", {})
    lines += [f"Machine: {payload.get('machine')}; load average (1, 5, 15 min) at the start "
              f"{load.get('start')}, at the end {load.get('end')} (a shared machine: seconds "
              f"are upper bounds; ratios within this run are fair).", "",
              f"Command: `{payload.get('command')}` at `{payload.get('git_commit')}`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
