"""Run a command-line script of ltnet_tf (``predict.py``, ``train.py``) and record when it reaches
each stage, for ``bench.cohort``: the same events for any version of the code, without changing it.

    python bench/cohort_timeline.py TIMELINE.json SCRIPT.py [its arguments]

Run by path (not ``-m``) so that ``PYTHONPATH`` alone decides which ``ltnet_tf`` is measured (a git
worktree of an older commit has no ``bench/cohort_timeline.py``). The library's functions are
wrapped when their modules are first imported (a post-import hook: nothing is imported earlier than
the script itself imports it), and each call's start and end time is recorded; ``import
tensorflow`` is timed too. The events are written to TIMELINE.json at exit: {'start': time this
wrapper started, 'start_cpu', 'events': [[name, 'begin'|'end', time, CPU seconds of the process
so far]], 'exit', 'exit_cpu': at the last exit handler} (Unix seconds; CPU: user + system, all
threads). Only the standard library is imported here.
"""
from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.util
import json
import os
import runpy
import sys
import time

START, START_CPU = time.time(), sum(os.times()[:2])
EVENTS = []
# module -> [(attribute path, event name)]: the stages of predict.py and train.py.
WATCHED = {
    "ltnet_tf.prediction.cohort": [("predict_files", "predict_files"),
                                   ("load_atlases", "load_atlases"),
                                   ("check_inputs", "check_inputs")],
    "ltnet_tf.prediction.sources": [("RunFolderNetwork.__init__", "network")],
    "ltnet_tf.prediction.predictor": [("Predictor.__init__", "predictor")],
    "ltnet_tf.prediction.lock": [("OutputLock.acquire", "lock")],
    "ltnet_tf.prediction.run_records": [("RunRecords.add", "scan"),
                                        ("RunRecords.write", "tables")],
    "ltnet_tf.training.trainer": [("train", "train"), ("_fit", "fit")],
    "ltnet_tf.training.callbacks": [("StopAtStep.on_train_batch_end", "step")],
}


def _record(name: str, what: str) -> None:
    EVENTS.append([name, what, time.time(), sum(os.times()[:2])])


def _timed(function, name):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _record(name, "begin")
        try:
            return function(*args, **kwargs)
        finally:
            _record(name, "end")
    return wrapper


def _patch(module) -> None:
    for path, name in WATCHED.get(module.__name__, ()):
        owner, *rest = path.split(".")
        if not hasattr(module, owner):
            continue  # not in this version of the code
        if rest:
            cls = getattr(module, owner)
            setattr(cls, rest[0], _timed(getattr(cls, rest[0]), name))
        else:
            setattr(module, owner, _timed(getattr(module, owner), name))


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, name):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if self.name == "tensorflow":
            _record("import_tensorflow", "begin")
        try:
            self.loader.exec_module(module)
        finally:
            if self.name == "tensorflow":
                _record("import_tensorflow", "end")
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of the watched modules (and TensorFlow's)."""

    def find_spec(self, name, path=None, target=None):
        if name not in WATCHED and name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, name)
        return spec


def _write(path: str) -> None:
    payload = {"start": START, "start_cpu": START_CPU, "events": EVENTS, "exit": time.time(),
               "exit_cpu": sum(os.times()[:2]), "pid": os.getpid()}
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    timeline, script, *arguments = sys.argv[1:]
    sys.meta_path.insert(0, _Finder())
    atexit.register(_write, timeline)
    sys.argv = [script, *arguments]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
