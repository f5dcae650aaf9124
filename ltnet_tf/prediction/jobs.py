"""``predict.py --jobs N``: one run's scans segmented by N processes, its tables written by one.

TensorFlow's thread pools are fixed (``determinism``: 2 threads whatever the machine) so that a
scan gives the same bits everywhere; one process then keeps about two cores busy. N jobs keep 2N
busy, and every scan still gives the same bits: a scan's result does not depend on the process
that segments it (``bench.reliability``: first scan of a process or a later one, alone or in a
cohort). The process ``predict.py`` started is job 1: it holds the output folder's lock, checks
every input, loads its model, starts jobs 2..N on their shares of the scans still to do, segments
its own share, then waits for them and writes ``volumes.csv``, the Dice tables,
``prediction.json`` and ``report.html`` from every scan's journal record (``resumable``): the
files one process writes, byte for byte.

    shares    the scans to do, sorted, dealt round robin: job k gets the k-th, the (k+N)-th, ...
    jobs      spawned processes (fresh interpreters: nothing of TensorFlow's state is forked),
              each building the same predictor (``cohort.segment_share``) and running the same
              per-scan loop (``resumable.segment_scans``); each sends job 1 a line per scan
              finished, numbered in the run's count, and how it ended
    stops     a job dies with job 1, however job 1 ends (SIGKILL included: ``PR_SET_PDEATHSIG``
              on Linux, a watchdog thread elsewhere); SIGTERM or Ctrl-C to job 1 stop every job
              between two Python steps; finished scans are kept and the same command continues
    errors    a job's error (a scan that cannot be segmented, a full disk) stops the others and is
              raised by job 1 as its own; a job killed from outside is named with its signal

How many jobs by default (``default_jobs``): one per ``determinism.COMPUTE_THREADS`` cores this
process may use (its CPU affinity, and a cgroup's CPU quota: a container's or a SLURM job's
share), and no more than the available memory holds at ``JOB_MEMORY_GB`` per job plus
``ATLAS_MEMORY_GB`` per further atlas (each job holds its model and atlases and one scan in
flight, a second read ahead). On 2 cores: 1 job. On 16 cores with 32 GB free: 8.
"""
from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import pickle
import signal
import sys
import threading
import time

from absl import logging

from ltnet_tf.errors import DataError

# This module imports no TensorFlow: a job's process imports it first, and is bound to job 1's
# life (``_die_with``) before it imports anything else.

# Peak resident memory of predict.py on two native 256³ scans (/usr/bin/time -v): 2.1 GB with one
# atlas, 3.6 GB with five (0.37 GB per further atlas); 2.6 GB with one atlas and a trained network
# (bench/results/cohort.md at commit ecbe0b4). Rounded up: a job should never be what runs the
# machine out of memory.
JOB_MEMORY_GB = 3.0
ATLAS_MEMORY_GB = 0.5
STOP_SECONDS = 30  # how long stopped jobs may take to end before they are killed


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, and a cgroup v2 CPU quota (a container's
    or a cluster job's share) when one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores or 1)


def available_memory_gb():
    """Memory available to new processes (``MemAvailable``, within a cgroup v2 limit), in GB;
    None where it cannot be read."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                available = min(available, int(limit) - int(f.read()))
    except (OSError, ValueError, KeyError):
        pass
    return None if available is None else available / 1e9


def default_jobs(threads_per_job, atlases: int = 1) -> int:
    """The job count of the module docstring's rule; ``threads_per_job``: TensorFlow's pool size
    (None: the machine's own pools, which use every core: 1 job)."""
    if threads_per_job is None:
        return 1
    by_cores = max(1, usable_cores() // threads_per_job)
    memory = available_memory_gb()
    if memory is None:
        return by_cores
    per_job = JOB_MEMORY_GB + ATLAS_MEMORY_GB * max(0, atlases - 1)
    return max(1, min(by_cores, int(memory // per_job)))


class Jobs:
    """Jobs 2..``count`` of one run: ``work(request, key, pairs, report)`` (a module-level
    function, so that a spawned process finds it) segments a share ``pairs`` into the journal of
    ``key``; ``report(name, record)`` tells job 1 a scan is finished."""

    def __init__(self, count: int, work, request):
        self.count, self.work, self.request = int(count), work, request
        self.pairs = []  # the scans of jobs 2..N
        self._running = []  # [(job number, process, connection)]
        self._started = 1  # jobs of this run, job 1 included
        self._ended = set()  # numbers of the jobs whose connection closed (all said)
        self._error = None
        self._listener = None

    def start(self, todo: list, key: str, progress) -> list:
        """Start the jobs on their shares of ``todo`` (records keyed ``key``); -> job 1's share."""
        count = self._started = min(self.count, len(todo))
        shares = [todo[k::count] for k in range(count)]
        context = multiprocessing.get_context("spawn")
        print(f"{count} jobs segment the {len(todo)} scans to do (job 1 is this process, "
              f"{os.getpid()})", flush=True)
        work = f"{self.work.__module__}:{self.work.__qualname__}"
        for number, share in enumerate(shares[1:], start=2):
            receive, send = context.Pipe(duplex=False)
            payload = pickle.dumps((self.request, key, share))  # read once the job is bound
            process = context.Process(target=_job, name=f"ltnet-predict-job-{number}",
                                      args=(work, payload, send, os.getpid()))
            process.start()
            send.close()
            self._running.append((number, process, receive))
            self.pairs += share
        self._listener = threading.Thread(target=self._listen, args=(progress, count),
                                          daemon=True)
        self._listener.start()
        return shares[0]

    def _listen(self, progress, count: int) -> None:
        """Job 1's ear: print each scan another job finished, keep the first error."""
        open_connections = {connection: number for number, _, connection in self._running}
        while open_connections:
            for connection in multiprocessing.connection.wait(list(open_connections)):
                number = open_connections[connection]
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    del open_connections[connection]  # the job ended (how: ``check``)
                    self._ended.add(number)
                    continue
                if message[0] == "scan":
                    progress.done(*message[1:])
                elif message[0] == "error" and self._error is None:
                    self._error = _raised_here(number, count, *message[1:])

    def check(self) -> None:
        """Raise the first error a job reported (the other jobs stopped first); else nothing."""
        if self._error is None:
            for number, process, _ in self._running:
                if process.exitcode not in (None, 0):
                    deadline = time.time() + 5
                    while number not in self._ended and time.time() < deadline:
                        time.sleep(0.05)  # its last words, if it had any, reach the listener
                    self._error = self._error or _ended(number, self._started, process.exitcode)
                    break
        if self._error is not None:
            self.stop()
            raise self._error

    def wait(self) -> None:
        """Wait for every job to finish its share; raise the first error one reported."""
        while any(process.is_alive() for _, process, _ in self._running):
            self.check()
            time.sleep(0.2)
        self._listener.join()
        self.check()

    def stop(self) -> None:
        """Stop the jobs still running (SIGTERM: between two Python steps), kill those that do
        not end within ``STOP_SECONDS``, and hear what they said before they ended."""
        for _, process, _ in self._running:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.time() + STOP_SECONDS
        for _, process, _ in self._running:
            process.join(max(0.0, deadline - time.time()))
            if process.is_alive():
                process.kill()
                process.join()
        if self._listener is not None:
            self._listener.join(timeout=5)


def _raised_here(number: int, count: int, error: Exception, cause_errno, bug: bool):
    """A job's error as job 1 raises it: its own one-line errors as they are (a full disk's
    cause kept, so the run's message counts every job's scans), a bug with the job named."""
    if cause_errno is not None:
        error.__context__ = OSError(cause_errno, os.strerror(cause_errno))
    if bug:  # not the user's input: the job printed its traceback
        return RuntimeError(f"job {number} of {count} failed: {type(error).__name__}: {error}")
    return error


def _ended(number: int, count: int, exitcode: int) -> DataError:
    """A job that ended without saying why: killed from outside (the OOM killer, a user)."""
    signum = -exitcode if exitcode < 0 else exitcode - 128 if exitcode > 128 else None
    how = f"by {signal.Signals(signum).name}" if signum else f"with exit status {exitcode}"
    return DataError(f"job {number} of {count} of this run ended {how}: the scans finished are "
                     f"kept; run the same command again to continue")


def _job(work: str, payload: bytes, connection, parent: int) -> None:
    """A spawned job: bound to job 1's life, then ``work`` ('module:function') on the request,
    key and share in ``payload``; job 1 hears of each scan and of how the job ended."""
    _die_with(parent)
    for signum in (signal.SIGTERM, signal.SIGINT):  # stopped while starting: nothing written yet,
        signal.signal(signum, _stopped_while_starting)  # and job 1 speaks for the run
    from ltnet_tf.config import ConfigError
    from ltnet_tf.serving.modeldir import ModelDirError
    from ltnet_tf.training import signals

    module, _, name = work.partition(":")
    try:
        with signals.stop_on_signals():
            request, key, pairs = pickle.loads(payload)
            getattr(importlib.import_module(module), name)(
                request, key, pairs, lambda scan, record: connection.send(("scan", scan, record)))
    except KeyboardInterrupt as stop:  # SIGTERM or Ctrl-C: job 1 says what is kept
        sys.exit(signals.exit_code(stop))
    except Exception as e:  # noqa: BLE001  (sent to job 1, which raises it)
        cause = e if isinstance(e, OSError) else e.__context__
        bug = not isinstance(e, (DataError, ConfigError, ModelDirError, OSError))
        if bug:
            logging.exception("job failed")
        connection.send(("error", _picklable(e), getattr(cause, "errno", None), bug))
        sys.exit(1)


def _stopped_while_starting(signum, frame):  # noqa: ARG001
    os._exit(128 + signum)


def _picklable(error: Exception) -> Exception:
    try:
        multiprocessing.reduction.ForkingPickler.dumps(error)
        return error
    except Exception:  # noqa: BLE001  (an exception that cannot cross: its text can)
        return RuntimeError(f"{type(error).__name__}: {error}")


def _die_with(parent: int) -> None:
    """End this process when job 1 ends, however it ends: the kernel kills it (Linux), or a
    watchdog thread sees it orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        killed_by_kernel = sys.platform.startswith("linux")
    except (OSError, AttributeError):  # not Linux
        killed_by_kernel = False
    if os.getppid() != parent:  # ended before the line above
        os._exit(1)
    if killed_by_kernel:
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
