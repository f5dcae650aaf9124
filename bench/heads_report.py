"""bench/results/heads.md from heads.json (``python -m bench.heads`` writes both)."""
from __future__ import annotations


def _heads_table(heads: dict) -> list:
    lines = ["| head | mask Dice | brain left out | mask L | extraction s | N4 s | all CPU s | "
             "Dice from head (N4) | (no N4) | from native | with bias (N4) | (no N4) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in heads.items():
        head, biased = entry["head"], entry.get("biased")
        bias_cells = (f"{biased['dice_n4']:.4f} | {biased['dice_no_n4']:.4f}" if biased
                      else "- | -")
        lines.append(
            f"| {name} | {head['dice']:.4f} | {head['brain_left_out_pct']:.2f} % | "
            f"{head['mask']['volume_l']:.2f} | {head['extraction_seconds']:.1f} | "
            f"{head['n4_seconds']:.1f} | {head['cpu_seconds']:.1f} | {head['dice_n4']:.4f} | "
            f"{head['dice_no_n4']:.4f} | {entry['native_dice']:.4f} | {bias_cells} |")
    return lines


def _contrast_table(contrast: dict) -> list:
    lines = ["| scan | T1 | T2-like | FLAIR-like | PD-like | similarity (T2/FLAIR/PD) |",
             "|---|---|---|---|---|---|"]
    for name, entry in contrast.items():
        similarity = "/".join(str(entry[c]["similarity"]) for c in ("t2", "flair", "pd"))
        lines.append(f"| {name} | " + " | ".join(f"{entry[c]['dice']:.4f}" for c in
                                                  ("t1", "t2", "flair", "pd"))
                     + f" | {similarity} |")
    return lines


def _load(run: dict) -> str:
    load = run.get("load_average_1min")
    return (f" (load {load['start']:.1f} -> {load['end']:.1f})" if load
            else " (load 9-16: a shared machine)")


def markdown(results: dict) -> str:
    summary, targets = results["summary"], results["targets"]
    runs = results.get("runs") or {"all": {"command": results["command"],
                                            "commit": results["commit"]}}
    made = "; ".join(f"{part}: `{run['command']}` at commit `{run['commit']}`" + _load(run)
                     for part, run in runs.items())
    lines = ["# Whole heads, bias fields, other contrasts", "",
             f"{made}; on a 2-core CPU (where the load was above 2, other jobs shared the cores: "
             "wall seconds are upper bounds there; CPU seconds are the process's own). Segmenting "
             "without a trained network "
             "(the atlas of ../shared/data, refinement at its defaults), Dice of the 28 benchmark "
             "structures on each scan's own grid. See `bench/heads.py` for every step and "
             "`bench/contrasts.py` for how bias fields and contrasts are made.", ""]
    if "brain_mask" in summary:
        mask = summary["brain_mask"]
        lines += ["## Summary", "",
                  f"- brain_mask: mean Dice {mask['mean_dice']:.4f} (target >= "
                  f"{targets['brain_mask_mean_dice']}), min {mask['min_dice']:.4f} (>= "
                  f"{targets['brain_mask_min_dice']}), labelled brain left out at most "
                  f"{mask['max_brain_left_out_pct']:.2f} % (<= {targets['brain_left_out_pct']} %), "
                  f"extraction at most {mask['max_extraction_seconds']:.1f} s wall per head, "
                  f"preparation {mask['mean_cpu_seconds']:.1f} CPU s per head on average "
                  f"(target <= {targets['seconds_per_head']} s)"]
        for variant, label in (("dice_n4", "with N4"), ("dice_no_n4", "without N4")):
            entry = summary[f"from_head_{variant}"]
            lines.append(f"- from_head ({label}): mean Dice {entry['mean_head']:.4f} from the "
                         f"heads, {entry['mean_native']:.4f} from FreeSurfer's stripped scans: "
                         f"difference {entry['mean_difference']:+.4f} (target >= "
                         f"{targets['from_head_difference']})")
        for variant, label in (("dice_n4", "with N4"), ("dice_no_n4", "without N4")):
            entry = summary.get(f"bias_{variant}")
            if entry:
                lines.append(f"- bias (+-25 %, {label}): mean Dice difference "
                             f"{entry['mean_difference']:+.4f} against the head without the "
                             f"field (with N4), largest drop {entry['largest_drop']:+.4f} "
                             f"(target within {targets['bias_difference']})")
    if "contrast" in summary:
        entry = summary["contrast"]
        lines.append(f"- contrast: mean Dice T1 {entry['t1']:.4f}, T2-like {entry['t2']:.4f}, "
                     f"FLAIR-like {entry['flair']:.4f}, PD-like {entry['pd']:.4f} (target "
                     f"within {targets['contrast_difference']} of T1)")
    if results.get("heads"):
        lines += ["", "## Per head", ""] + _heads_table(results["heads"])
    if results.get("contrast"):
        lines += ["", "## Per scan and contrast", ""] + _contrast_table(results["contrast"])
    return "\n".join(lines) + "\n"
