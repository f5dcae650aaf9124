"""Joining the shares of a cohort segmented by several processes (``predict.py --shard K/N``).

    ltnet-merge OUT [OUT2 ...] [--output_dir DEST]      (or python -m ltnet_tf.prediction.merge)

Each ``predict.py --shard K/N`` writes its scans' files and its tables under names marked
``.shard-K-of-N`` (``prediction.shard-K-of-N.json``, ``volumes...csv``, ``dice...csv/json``), so
N jobs can share one output folder (a SLURM array job) or use one each. The merge reads every
share found in the folders given, checks that they were made by the same model, atlases and
settings (``producer`` in prediction.json) and that no scan was segmented twice, then writes the
cohort's ``volumes.csv``, ``dice.csv``/``dice.json`` (when references were given),
``prediction.json`` and ``report.html`` into ``DEST`` (default: the first folder). A share that is
missing (K of N never written) is named in a warning; the merge covers what is there.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import sys

from ltnet_tf.config import ConfigError
from ltnet_tf.files import atomic_write
from ltnet_tf.io.label_names import LabelNames
from ltnet_tf.reporting import tables as reports

SHARD_RECORD = re.compile(r"^prediction\.shard-(\d+)-of-(\d+)\.json$")


class MergeError(ValueError):
    """The shares cannot be joined (duplicates, other models, nothing to merge); one line."""


def find_shares(folders) -> list:
    """[(folder, prediction record path, K, N)] of every share in ``folders`` (an unsharded
    ``prediction.json`` counts as share 1 of 1)."""
    shares = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise MergeError(f"{folder}: not a folder")
        found = []
        for path in sorted(glob.glob(os.path.join(folder, "prediction*.json"))):
            match = SHARD_RECORD.match(os.path.basename(path))
            if match:
                found.append((folder, path, int(match.group(1)), int(match.group(2))))
            elif os.path.basename(path) == "prediction.json":
                found.append((folder, path, 1, 1))
        if not found:
            raise MergeError(f"{folder}: no prediction.json or prediction.shard-K-of-N.json "
                             f"(is it an output folder of predict.py?)")
        shares.extend(found)
    return shares


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise MergeError(f"{path}: cannot be read ({e})") from None


def _check(shares, records) -> None:
    """Same producer everywhere, no scan twice, one N; warns about missing shares."""
    first_path, first = shares[0][1], records[0]
    seen = {}
    for (folder, path, k, n), record in zip(shares, records):
        if record.get("producer") != first.get("producer"):
            raise MergeError(f"{path}: made by another model, atlases or settings than "
                             f"{first_path} (their 'producer' records differ); merge only the "
                             f"shares of one prediction")
        for name in record.get("scans", {}):
            if name in seen:
                raise MergeError(f"{path}: scan '{name}' is also in {seen[name]}; each scan "
                                 f"must be in one share only")
            seen[name] = path
    counts = {n for _, _, _, n in shares}
    if len(counts) > 1:
        raise MergeError(f"shares of different splits ({', '.join(f'of {n}' for n in counts)}): "
                         f"merge the shares of one --shard K/N run")
    n = counts.pop()
    missing = sorted(set(range(1, n + 1)) - {k for _, _, k, _ in shares})
    if missing:
        print(f"warning: shares {', '.join(f'{k}/{n}' for k in missing)} not found: the merge "
              f"covers {len(shares)} of {n}", file=sys.stderr)


def _volumes(shares) -> tuple:
    """(header, rows) of every share's volumes table; the headers must agree."""
    header, rows = None, []
    for folder, path, k, n in shares:
        suffix = "" if n == 1 else f".shard-{k}-of-{n}"
        table = os.path.join(folder, f"volumes{suffix}.csv")
        with open(table, newline="") as f:
            lines = list(csv.reader(f))
        if header is not None and lines[0] != header:
            raise MergeError(f"{table}: other structures than the other shares' tables")
        header = lines[0]
        rows.extend(lines[1:])
    return header, sorted(rows, key=lambda row: row[0])


def _relative_qc(record: dict, folder: str, destination: str) -> dict:
    if record.get("qc_png"):
        record = {**record, "qc_png": os.path.relpath(os.path.join(folder, record["qc_png"]),
                                                      destination)}
    return record


def merge(folders, destination: str = None) -> dict:
    """Join the shares found in ``folders`` into ``destination`` (default the first folder);
    returns the merged prediction record. Raises MergeError with a one-line message."""
    folders = [os.path.abspath(f) for f in folders]
    destination = os.path.abspath(destination or folders[0])
    shares = find_shares(folders)
    records = [_load(path) for _, path, _, _ in shares]
    _check(shares, records)
    os.makedirs(destination, exist_ok=True)
    header, rows = _volumes(shares)
    with atomic_write(os.path.join(destination, "volumes.csv"), newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    scans = {}
    for (folder, _, _, _), record in zip(shares, records):
        for name, scan in record.get("scans", {}).items():
            scans[name] = _relative_qc(scan, folder, destination)
    scans = dict(sorted(scans.items()))
    dice = _merge_dice(shares, destination)
    merged = {**{k: v for k, v in records[0].items() if k not in ("scans", "shard")},
              "shard": None,
              "merged_from": [os.path.relpath(p, destination) for _, p, _, _ in shares],
              "images": sorted(p for r in records for p in r.get("images", [])),
              "outputs": {n: s["output"] for n, s in scans.items()},
              "alignment_failed": sorted(n for n, s in scans.items() if not s["alignment_ok"]),
              "scans": scans, "mean_dice": None if dice is None else dice["mean_dice"]}
    if any(r.get("labels") for r in records):
        merged["labels"] = sorted(p for r in records for p in (r.get("labels") or []) if p)
    reports.write_prediction_json(destination, merged)
    from ltnet_tf.reporting import report  # matplotlib only if a page is drawn

    report.write_report_html(destination, merged)
    return merged


def _merge_dice(shares, destination):
    """dice.csv/json of all shares' scans (None when no share had references)."""
    per_scan, names, label_ids = {}, {}, set()
    for folder, path, k, n in shares:
        suffix = "" if n == 1 else f".shard-{k}-of-{n}"
        table = os.path.join(folder, f"dice{suffix}.json")
        if not os.path.isfile(table):
            continue
        report = _load(table)
        for label, info in report["structures"].items():
            names[int(label)] = info["name"]
        for scan, info in report["scans"].items():
            per_scan[scan] = {int(label): (float("nan") if value is None else value)
                              for label, value in info["dice"].items()}
            label_ids |= set(per_scan[scan])
    if not per_scan:
        return None
    per_scan = dict(sorted(per_scan.items()))
    label_names = LabelNames(names, source="merged shares")
    return reports.write_dice_reports(per_scan, [0, *sorted(label_ids)], destination,
                                      label_names)


def main(argv=None) -> int:
    """``ltnet-merge OUT [OUT2 ...] [--output_dir DEST]``; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--helpfull"):
        print(__doc__)
        return 0 if argv else 1
    destination = None
    if "--output_dir" in argv:
        index = argv.index("--output_dir")
        if index + 1 >= len(argv):
            print("ltnet-merge: error: --output_dir needs a folder", file=sys.stderr)
            return 1
        destination = argv[index + 1]
        del argv[index:index + 2]
    try:
        merged = merge(argv, destination)
    except (MergeError, ConfigError, OSError) as e:
        print(f"ltnet-merge: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    mean = merged["mean_dice"]
    print(f"{len(merged['scans'])} scans merged into {os.path.abspath(destination or argv[0])}"
          + ("" if mean is None or not math.isfinite(mean) else f"; mean Dice {mean:.4f}"))
    return 0


def entry():  # console script
    sys.exit(main())


if __name__ == "__main__":
    entry()
