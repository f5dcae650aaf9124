"""fusion.md: the tables of ``python -m bench.fusion``'s results (fusion.json's content).

Per validation set: Dice and seconds per scan of every configuration, the ratio of its seconds to
ANTs joint label fusion's and its Dice minus the one-shot result's (``atlases_1``), both on the
subjects the two have in common; per-subject and per-structure figures; seconds per stage. Then the
ANTs settings and the exact subjects ANTs ran on, each configuration's method and command, and the
speed part of ``ltnet_tf.registration.fusion``.
"""
from __future__ import annotations

import numpy as np

from ltnet_tf.files import atomic_write
from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name

ONE_SHOT = "atlases_1"
ANTS_SECONDS = ("what each ANTs configuration would take alone: reading the scan (and resampling "
                "it to the registration grid), SyN of each of its atlases and the warp of their "
                "labels (for joint label fusion also of their images), its own fusion, writing "
                "its segmentation. The registrations run once per scan and are shared by the "
                "ANTs configurations of the run; ants_syn_1 is the primary atlas's registration.")


def write_markdown(results: dict, path: str) -> None:
    """Writes ``path`` (under a temporary name, then renamed)."""
    with atomic_write(path) as f:
        f.write("\n".join(markdown(results)) + "\n")


def markdown(results: dict) -> list:
    lines = ["# Multi-atlas segmentation: the product with several atlases, against ANTs", "",
             f"Last run: `{results['command']}`, commit `{results['git_commit'][:12]}`; "
             f"{results['machine']}.", "",
             "Mean Dice over the 28 structures of Table 1 on the atlas grid at full resolution. "
             "A configuration of N atlases uses the primary atlas and the first N - 1 extra "
             "ones (listed per configuration below). Seconds per scan: one scan end to end "
             "(read the NIfTI, register, refine, fuse, write the segmentation), mean over the "
             "scans it ran on; load: reading the atlases and the model, and the first call's "
             "graph tracing, paid once per process. The machine is shared (2 cores): load "
             "averages during each configuration are in fusion.json.", ""]
    for set_name, entries in results["sets"].items():
        lines += _set_section(set_name, entries, results.get("set_info", {}).get(set_name) or {})
    lines += _ants_section(results["sets"])
    lines += _methods(results["sets"])
    if results.get("speed"):
        lines += _speed_section(results["speed"])
    return lines


# ------------------------------------------------------------------------------- per set
def _mean_over(entry: dict, key: str, subjects: list):
    """Mean of ``entry[key]`` (per subject) over ``subjects``; None if one is missing."""
    values = entry[key]
    if not subjects or any(s not in values for s in subjects):
        return None
    return float(np.mean([values[s] for s in subjects]))


def _reference_jlf(entries: dict):
    """ANTs joint label fusion of the most atlases in this set: (name, entry) or (None, None)."""
    jlf = [(int(n.rsplit("_", 1)[1]), n) for n in entries if n.startswith("ants_jlf_")]
    if not jlf:
        return None, None
    name = max(jlf)[1]
    return name, entries[name]


def _cell(value, form: str) -> str:
    return "–" if value is None else format(value, form)


def _set_section(set_name: str, entries: dict, info: dict) -> list:
    subjects = info.get("subjects") or sorted({s for e in entries.values() for s in e["subjects"]})
    jlf_name, jlf = _reference_jlf(entries)
    ants_subjects = jlf["subjects"] if jlf else []
    subset = bool(jlf) and ants_subjects != subjects
    one_shot = entries.get(ONE_SHOT)
    lines = [f"## {set_name}: {', '.join(subjects)}", "", info.get("note", ""), "",
             "| config | start | atlases | fusion | Dice | "
             + (f"Dice on {', '.join(ants_subjects)} | " if subset else "")
             + f"s/scan | seconds / {jlf_name or 'ANTs JLF'}'s | Dice − {ONE_SHOT} | load s |",
             "|---|---|---|---|---|" + ("---|" if subset else "") + "---|---|---|---|"]
    for name, e in entries.items():
        dice = f"**{e['mean_dice']:.3f}**" + (
            "" if e["complete"] else f" (partial: {len(e['subjects'])} scans)")
        common = [s for s in e["subjects"] if jlf and s in jlf["per_subject_seconds"]]
        ours, theirs = (_mean_over(e, "per_subject_seconds", common),
                        _mean_over(jlf, "per_subject_seconds", common) if jlf else None)
        ratio = None if ours is None or not theirs else ours / theirs
        difference = (None if one_shot is None or _mean_over(one_shot, "per_subject",
                                                             e["subjects"]) is None
                      else e["mean_dice"] - _mean_over(one_shot, "per_subject", e["subjects"]))
        lines.append(
            f"| {name} | {e['start']} | {len(e['atlases'])} | {e['fusion'] or '–'} | {dice} | "
            + (f"{_cell(_mean_over(e, 'per_subject', ants_subjects), '.3f')} | " if subset else "")
            + f"{e['seconds_per_scan']:.1f} | {_cell(ratio, '.4f')} | "
            f"{_cell(difference, '+.3f')} | {e['model_load_s']:.1f} |")
    lines += ["", f"Seconds / {jlf_name or 'ANTs JLF'}'s: mean seconds per scan over the subjects "
              f"both ran ({', '.join(ants_subjects) or 'none'}). Dice − {ONE_SHOT}: over the "
              f"configuration's own subjects.", ""]
    return lines + _per_subject(entries, subjects) + _stages(entries) + _per_structure(entries)


def _per_subject(entries: dict, subjects: list) -> list:
    lines = ["Per subject (Dice / seconds):", "", "| subject | " + " | ".join(entries) + " |",
             "|---|" + "---|" * len(entries)]
    for subject in subjects:
        cells = [f"{e['per_subject'][subject]:.3f} / {e['per_subject_seconds'][subject]:.1f} s"
                 if subject in e["per_subject"] else "–" for e in entries.values()]
        lines.append(f"| {subject} | " + " | ".join(cells) + " |")
    return lines + [""]


def _stages(entries: dict) -> list:
    stages = list(dict.fromkeys(k for e in entries.values()
                                for k in e.get("stage_seconds_per_scan", {})))
    lines = ["Seconds per scan by stage (the product: align, network, refine, labels = fusion "
             "weights and the labels pulled onto the scan; ANTs: as counted below):", "",
             "| config | " + " | ".join(stages) + " | folding | load average |",
             "|---|" + "---|" * len(stages) + "---|---|"]
    for name, e in entries.items():
        cells = [_cell(e.get("stage_seconds_per_scan", {}).get(k), ".1f") for k in stages]
        load = e.get("load_average_1_5_15min", {})
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {100 * e['folding_fraction']:.3f}% | "
                     + (f"{load['start'][0]:.1f} -> {load['end'][0]:.1f}" if load else "–")
                     + " |")
    return lines + ["", "Folding: brain voxels where the Jacobian determinant of the primary "
                    "atlas's deformation is <= 0 (ANTs: mean over its atlases). Load average: "
                    "the machine's 1-minute load at the configuration's start and end (other "
                    "users' jobs slow every method; 2 cores).", ""]


def _per_structure(entries: dict) -> list:
    lines = ["Per structure (Dice):", "", "| structure | " + " | ".join(entries) + " |",
             "|---|" + "---|" * len(entries)]
    for label in BENCHMARK_LABELS:
        name = structure_name(label)
        lines.append(f"| {name} | " + " | ".join(f"{e['per_structure'][name]:.3f}"
                                               for e in entries.values()) + " |")
    return lines + [""]


# ------------------------------------------------------------------------------- run-wide
def _ants_section(sets: dict) -> list:
    runs = {}
    for set_name, entries in sets.items():
        for name, e in entries.items():
            if e["kind"] == "ants":
                runs.setdefault(name, []).append((set_name, e))
    if not runs:
        return []
    lines = ["## ANTs: exactly what ran", "", f"Seconds are {ANTS_SECONDS}", "",
             "| config | subjects | registration grid | JLF search radius | intensities x | "
             "registrations shared by |", "|---|---|---|---|---|---|"]
    for name, found in runs.items():
        for set_name, e in found:
            a = e["ants"]
            grid = f"{a['spacing_mm']:g} mm" if a["spacing_mm"] else "full (1 mm)"
            lines.append(f"| {name} | {set_name}: {', '.join(e['subjects'])} | {grid} | "
                         f"{a['search_radius'] if e['fusion'] == 'jlf' else '–'} | "
                         f"{a['intensity_scale']:g} | {', '.join(a['registrations_shared_by'])} |")
    return lines + [""]


def _methods(sets: dict) -> list:
    rows = {}
    for set_name, entries in sets.items():
        for name, e in entries.items():
            row = (name, e["method"], ", ".join(a["name"] for a in e["atlases"]), e["command"],
                   e["git_commit"][:12])
            rows.setdefault(row, []).append(set_name)
    if not rows:
        return []
    lines = ["## Configurations", "", "| config | sets | method | atlases | command | commit |",
             "|---|---|---|---|---|---|"]
    for (name, method, atlases, command, commit), set_names in rows.items():
        lines.append(f"| {name} | {', '.join(set_names)} | {method} | {atlases} | `{command}` | "
                     f"`{commit}` |")
    return lines + [""]


def _speed_section(speed: dict) -> list:
    lines = ["## Speed of `ltnet_tf.registration.fusion` (`--parts speed`)", "",
             f"`{speed['command']}`, commit `{speed['git_commit'][:12]}`, {speed['machine']}; "
             f"load average {speed['load_average_at_start']} at the start, "
             f"{speed['load_average_at_end']} at the end (1, 5, 15 min; other users' jobs). "
             f"Weights on the {'x'.join(map(str, speed['grid']))} refinement grid; atlases "
             f"{', '.join(speed['atlases'])} (affinely aligned only), scan {speed['scan']}.", "",
             "| measurement | median s | min s | numpy peak MB |", "|---|---|---|---|"]
    for name, row in {**speed["weights"], **speed["vote"]}.items():
        if isinstance(row, dict):
            lines.append(f"| {name} | {row['median_seconds']} | {row['min_seconds']} | "
                         f"{row['numpy_peak_mb']} |")
    lines += ["", f"fuse_labels points: {speed['vote']['points']}, disputed fraction "
              f"{speed['vote']['disputed_fraction']}", "",
              f"| fusion ({speed['scan']}, {len(speed['atlases'])} affinely aligned atlases) | "
              f"mean Dice (28) |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in speed["quality"].items()]
    return lines + [""]
