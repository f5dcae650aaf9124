"""What makes a killed prediction run resumable: one record per finished scan.

    OUT/.predict-journal/<scan>.json    written (atomically) once every file of the scan is in
                                        place: the scan's record, volumes and Dice, the digests of
                                        its scan and reference, the producer's key, and the size
                                        of each of its files

Running the same ``predict.py`` command again keeps a scan whose record says it was made by the
same producer (model or atlases, settings, the output flags: ``producer_key``) from the same scan
and reference, and whose files are all there with their recorded sizes; every other scan is
segmented (again). A scan made by another producer is redone, and its files replaced, not refused.
Every file is written under a temporary name and renamed (``ltnet_tf.files``), so a kill leaves at
most hidden temporary files (``.NAME.tmp-PID...``), which ``remove_temporary_files`` clears.
The run's tables are written at its end from the records of every scan, kept or new.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re

from ltnet_tf.files import atomic_write, file_digest

JOURNAL_FOLDER = ".predict-journal"
# Every file a scan may have (``outputs.OutputFolder.write_scan``, ``write_probabilities``, QC).
SCAN_FILE_SUFFIXES = ("_seg.nii.gz", "_affine.txt", "_aligned.nii.gz", "_aligned_seg.nii.gz",
                      "_warped_atlas.nii.gz", "_flow.nii.gz", "_probabilities.nii.gz", "_qc.png")
FORMAT = 1


def producer_key(producer: dict, outputs: dict) -> str:
    """SHA-256 of what made a scan's files (``RunRecords.producer()``) and which files were asked
    for (``outputs``: the output flags)."""
    text = json.dumps({"format": FORMAT, "producer": producer, "outputs": outputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _inputs(image_path: str, label_path) -> dict:
    return {"scan_sha256": file_digest(image_path),
            "reference_sha256": file_digest(label_path) if label_path else None}


def _number(value):
    """JSON has no NaN: a NaN Dice (a structure absent from both maps) is kept as "nan"."""
    return "nan" if isinstance(value, float) and math.isnan(value) else value


def _from_json(value):
    return float("nan") if value == "nan" else value


class Journal:
    """The finished-scan records of one output folder (``output_path``) for one producer
    (``key``, from ``producer_key``)."""

    def __init__(self, output_path: str, key: str):
        self.folder = os.path.join(output_path, JOURNAL_FOLDER)
        self.output_path, self.key = output_path, key

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.json")

    def finished(self, name: str, image_path: str, label_path) -> tuple:
        """(record, volumes {label: mm³}, dice {label: value} or None) of a scan finished earlier
        by this producer from this scan and reference, with all its files in place; else None
        (with the reason as second element: (None, reason), reason None when never recorded)."""
        try:
            with open(self._path(name)) as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return None, "its record is unreadable"
        if not isinstance(entry, dict) or entry.get("key") != self.key:
            return None, "made with other settings, model or atlases"
        if entry.get("inputs") != _inputs(image_path, label_path):
            return None, "its scan or reference changed"
        for file_name, size in entry.get("files", {}).items():
            path = os.path.join(self.output_path, file_name)
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                return None, f"{file_name} is missing or changed"
        volumes = {int(label): float(v) for label, v in entry["volumes"].items()}
        dice = (None if entry["dice"] is None else
                {int(label): float(_from_json(v)) for label, v in entry["dice"].items()})
        return (entry["record"], volumes, dice), None

    def record(self, name: str, image_path: str, label_path, record: dict, volumes: dict,
               dice) -> str:
        """Mark the scan ``name`` finished: call once every one of its files is written."""
        os.makedirs(self.folder, exist_ok=True)
        files = {}
        for suffix in SCAN_FILE_SUFFIXES:
            path = os.path.join(self.output_path, f"{name}{suffix}")
            if os.path.isfile(path):
                files[os.path.basename(path)] = os.path.getsize(path)
        entry = {"format": FORMAT, "key": self.key, "inputs": _inputs(image_path, label_path),
                 "files": files, "record": record,
                 "volumes": {str(int(label)): float(v) for label, v in volumes.items()},
                 "dice": None if dice is None else {str(int(label)): _number(float(v))
                                                    for label, v in dice.items()}}
        with atomic_write(self._path(name)) as f:
            json.dump(entry, f, allow_nan=False)
        return self._path(name)


def scan_file_names(name: str) -> list:
    """Every file name the scan ``name`` may have in the output folder."""
    return [f"{name}{suffix}" for suffix in SCAN_FILE_SUFFIXES]


def remove_temporary_files(output_path: str, file_names, scan_names=()) -> int:
    """Remove what a killed run left under temporary names (``ltnet_tf.files.temporary_name``)
    of the files ``file_names`` (tables) and of the scans ``scan_names`` (their files and
    records); returns how many. Only these: a share running beside this one (``--shard``) owns
    other names."""
    wanted = {os.path.join(output_path, n) for n in file_names}
    for scan in scan_names:
        wanted.update(os.path.join(output_path, n) for n in scan_file_names(scan))
        wanted.add(os.path.join(output_path, JOURNAL_FOLDER, f"{scan}.json"))
    patterns = {}
    for path in wanted:
        folder, name = os.path.split(path)
        stem, dot, extension = name.partition(".")
        patterns.setdefault(folder, []).append(
            re.escape(f".{stem}.tmp-") + r"\d+" + re.escape(f"{dot}{extension}"))
    removed = 0
    for folder, names in patterns.items():
        if not os.path.isdir(folder):
            continue
        pattern = re.compile("^(?:%s)$" % "|".join(names))
        for entry in os.listdir(folder):
            if pattern.match(entry):
                os.remove(os.path.join(folder, entry))
                removed += 1
    return removed
