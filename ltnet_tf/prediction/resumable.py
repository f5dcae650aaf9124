"""The per-scan loop of a prediction run, made to survive being stopped.

    kept      scans a previous run of the same command finished (``journal``): not redone
    segmented the others, one by one; each scan's record goes to the journal once its files are
              written (with ``--jobs N``, N processes run this loop, each on a share: ``jobs``)
    tables    volumes.csv, dice.csv/json, prediction.json, report.html: from every scan's record

SIGTERM (a scheduler's stop) and Ctrl-C stop between two Python steps: the file being written is
dropped (it was under a temporary name), the scans finished so far stay finished, and
``Stopped`` (a KeyboardInterrupt, from ``training.signals``) carries how far the run got. A full
disk (ENOSPC, a quota, a file-size limit) is a one-line DataError; what was written before is intact.
"""
from __future__ import annotations

import errno
import os
import threading

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


def run_cohort(run_record, pairs, with_references: bool, read_ahead, progress_line,
               jobs=None) -> dict:
    """Segment ``pairs`` [(scan path, reference or None)] with ``run_record`` (a
    ``run_records.RunRecords``), keeping scans a previous run finished; write the tables; ->
    ``RunRecords.write``'s result. ``read_ahead(pairs)`` yields (path, reference, scan,
    reading); ``progress_line(number, total, name, record)`` is printed per scan. ``jobs``: a
    ``jobs.Jobs`` that segments shares of the scans to do in other processes (``--jobs N``);
    their records are then read back from the journal, so the tables are those of one process.

    Raises DataError on a full disk (or a job's error); ``signals.Stopped`` (or
    KeyboardInterrupt) on SIGTERM or Ctrl-C, with ``finished`` and ``total`` scans set on it."""
    output, options = run_record.output, run_record.options
    key = journal_lib.producer_key(run_record.producer(), output_flags(options))
    journal = journal_lib.Journal(output.path, key)
    names = [data.scan_name(path) for path, _ in pairs]
    journal_lib.remove_temporary_files(output.path, table_names(options.shard), names)
    todo = _keep_finished(journal, run_record, pairs)
    progress = Progress(len(pairs) - len(todo), len(pairs), progress_line)
    started = None
    try:
        with signals.stop_on_signals():
            mine = todo
            if jobs is not None and jobs.count > 1 and len(todo) > 1:
                started, mine = jobs, jobs.start(todo, key, progress)
            segment_scans(run_record, journal, mine, read_ahead, progress.done,
                          after_each=started.check if started else None)
            if started is not None:
                started.wait()
                _take_records(journal, run_record, started.pairs)
            return run_record.write([p for p, _ in pairs],
                                    [r for _, r in pairs] if with_references else None)
    except KeyboardInterrupt as stop:
        stop.finished, stop.total = progress.stopped(started), len(pairs)
        raise
    except (OSError, DataError) as e:  # DataError: a writer that named the file already
        full = disk_full(e, output.path, progress.stopped(started))
        if full is None:
            raise
        raise full from None


def segment_scans(run_record, journal, pairs, read_ahead, done, after_each=None) -> None:
    """The per-scan loop (of a run, or of one job's share): segment each of ``pairs``, write its
    files and then its journal record, then ``done(name, record)``; ``after_each()`` between
    scans."""
    for image_path, label_path, scan, reading in read_ahead(pairs):
        name = data.scan_name(image_path)
        record = run_record.add(image_path, label_path, scan, reading)
        journal.record(name, image_path, label_path, run_record.records[name],
                       run_record.volumes[name], run_record.dice.get(name))
        done(name, record)
        if after_each is not None:
            after_each()


def segment_share(run_record, key: str, pairs, read_ahead, done) -> None:
    """A job of ``--jobs N`` other than the first: ``pairs`` segmented into job 1's journal
    (``key``); the tables are job 1's. Raises DataError if this job's model, atlases or settings
    would not make job 1's outputs (a file of the run changed meanwhile)."""
    own = journal_lib.producer_key(run_record.producer(), output_flags(run_record.options))
    if own != key:
        raise DataError(f"{run_record.output.path}: a job of this run found another model, other "
                        f"atlases or settings than the run's first job (did a file of the run "
                        f"change meanwhile?)")
    journal = journal_lib.Journal(run_record.output.path, key)
    segment_scans(run_record, journal, pairs, read_ahead, done)


def disk_full(error: Exception, output_path: str, finished: int):
    """The one-line DataError of a full disk (ENOSPC, a quota, a file-size limit) behind
    ``error``, saying the ``finished`` scans are intact; None for another error."""
    cause = error if isinstance(error, OSError) else error.__context__
    if getattr(cause, "errno", None) not in DISK_FULL:
        return None
    what = (str(error) if isinstance(error, DataError) else f"{error.filename or output_path}: "
            f"{error.strerror or os.strerror(error.errno)} while writing")
    return DataError(f"{what}: the {finished} scans finished before are intact; free space and "
                     f"run the same command again to continue")


class Progress:
    """How many of a run's ``total`` scans are finished (``finished`` at the start: kept from an
    earlier run), and the line printed as each one is; ``done`` is called by the loop and by the
    thread that hears the other jobs of ``--jobs N``."""

    def __init__(self, finished: int, total: int, line):
        self.finished, self.total, self.line = finished, total, line
        self._lock = threading.Lock()

    def done(self, name: str, record: dict) -> None:
        with self._lock:
            self.finished += 1
            print(self.line(self.finished, self.total, name, record), flush=True)

    def stopped(self, jobs) -> int:
        """The scans finished when the run stops, once its other jobs (if any) have stopped."""
        if jobs is not None:
            jobs.stop()
        return self.finished


def _take_records(journal, run_record, pairs) -> None:
    """The records the other jobs of ``--jobs N`` wrote to the journal for ``pairs``, taken into
    ``run_record`` as segmented by this run. Raises DataError when one is missing."""
    for image_path, label_path in pairs:
        name = data.scan_name(image_path)
        found, reason = journal.finished(name, image_path, label_path)
        if found is None:
            raise DataError(f"{journal.folder}: no record of {name} from the job that segmented "
                            f"it ({reason or 'never written'}); run the same command again")
        run_record.keep(name, *found, earlier=False)


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
