"""The per-scan loop of a prediction run, made to survive being stopped.

    kept      scans a previous run of the same command finished (``journal``): not redone
    segmented the others, one by one; each scan's record goes to the journal once its files are
    tables    volumes.csv, dice.csv/json, prediction.json, report.html: from every scan's record

SIGTERM (a scheduler's stop) and Ctrl-C stop between two Python steps: the file being written is
dropped (it was under a temporary name), the scans finished so far stay finished, and
``Stopped`` (a KeyboardInterrupt, from ``training.signals``) carries how far the run got. A full
disk (ENOSPC, a quota, a file-size limit) is a one-line DataError; what was written before is intact.
"""
from __future__ import annotations

import errno
import os

from absl import logging

from ltnet_tf.errors import DataError
from ltnet_tf.io import volumes as data
from ltnet_tf.prediction import journal as journal_lib
from ltnet_tf.training import signals

DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
TABLES = ("volumes", "dice", "prediction", "report")  # the run's tables, ``tables_names`` below


def output_flags(options) -> dict:
    """The flags that decide which files a scan gets (part of the journal's producer key)."""
    return {"save_aligned": options.save_aligned, "save_warped_atlas": options.save_warped_atlas,
            "save_flow": options.save_flow, "qc": options.qc,
            "probabilities": options.probabilities}


def table_names(shard) -> list:
    """volumes.csv, dice.csv, dice.json, prediction.json, report.html (with ``.shard-K-of-N``)."""
    suffix = "" if shard is None else ".shard-{}-of-{}".format(*shard)
    return [f"volumes{suffix}.csv", f"dice{suffix}.csv", f"dice{suffix}.json",
            f"prediction{suffix}.json", f"report{suffix}.html"]


def run_cohort(run_record, pairs, with_references: bool, read_ahead, progress_line) -> dict:
    """Segment ``pairs`` [(scan path, reference or None)] with ``run_record`` (a
    ``run_records.RunRecords``), keeping scans a previous run finished; write the tables; ->
    ``RunRecords.write``'s result. ``read_ahead(pairs)`` yields (path, reference, scan,
    reading); ``progress_line(number, total, name, record)`` is printed per scan.

    Raises DataError on a full disk; ``signals.Stopped`` (or KeyboardInterrupt) on SIGTERM or
    Ctrl-C, with ``finished`` and ``total`` scans set on it."""
    output, options = run_record.output, run_record.options
    key = journal_lib.producer_key(run_record.producer(), output_flags(options))
    journal = journal_lib.Journal(output.path, key)
    names = [data.scan_name(path) for path, _ in pairs]
    journal_lib.remove_temporary_files(output.path, table_names(options.shard), names)
    todo = _keep_finished(journal, run_record, pairs)
    finished = len(pairs) - len(todo)
    try:
        with signals.stop_on_signals():
            for image_path, label_path, scan, reading in read_ahead(todo):
                name = data.scan_name(image_path)
                record = run_record.add(image_path, label_path, scan, reading)
                journal.record(name, image_path, label_path, run_record.records[name],
                               run_record.volumes[name], run_record.dice.get(name))
                finished += 1
                print(progress_line(finished, len(pairs), name, record), flush=True)
            return run_record.write([p for p, _ in pairs],
                                    [r for _, r in pairs] if with_references else None)
    except KeyboardInterrupt as stop:
        stop.finished, stop.total = finished, len(pairs)
        raise
    except (OSError, DataError) as e:  # DataError: a writer that named the file already
        cause = e if isinstance(e, OSError) else e.__context__
        if getattr(cause, "errno", None) not in DISK_FULL:
            raise
        what = (str(e) if isinstance(e, DataError) else f"{e.filename or output.path}: "
                f"{e.strerror or os.strerror(e.errno)} while writing")
        raise DataError(f"{what}: the {finished} scans finished before are "
                        f"intact; free space and run the same command again to continue") \
            from None


def _keep_finished(journal, run_record, pairs) -> list:
    """Take the records of scans finished earlier (``journal``) into ``run_record``; -> the
    pairs still to segment. One line says how many were kept, one per scan redone and why."""
    todo, kept = [], 0
    for image_path, label_path in pairs:
        name = data.scan_name(image_path)
        found, reason = journal.finished(name, image_path, label_path)
        if found is None:
            if reason is not None:
                logging.info("%s: segmented again (%s)", name, reason)
            todo.append((image_path, label_path))
            continue
        record, volumes, dice = found
        run_record.keep(name, record, volumes, dice)
        kept += 1
    if kept:
        print(f"{kept} of {len(pairs)} scans were finished by an earlier run of this command "
              f"into {run_record.output.path}: kept, not segmented again", flush=True)
    return todo
