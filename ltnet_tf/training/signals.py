"""Stopping training on a signal: save the current step, then exit with 128 + the signal number.

Cluster schedulers end a job with SIGTERM and send SIGKILL after a grace period (SLURM's
``KillWait`` and Kubernetes' ``terminationGracePeriodSeconds``: 30 s by default), so a SIGTERM
that killed at once lost every step since the last checkpoint. Here SIGTERM and Ctrl-C (SIGINT)
during the step loop finish the step under way, save it, and raise ``Stopped``; ``--resume`` then
continues from exactly that step. Outside the step loop (reading the data, building the model,
exporting) there is nothing new to save: the signal raises ``Stopped`` at once. A second Ctrl-C
stops at once too, without the save.

    with stop_on_signals() as request:              # installs the handlers, restores the old ones
        model.fit(..., callbacks=[..., StopAtSignal(request, save)])

Several workers (MultiWorkerMirroredStrategy) must stop at the same step, since a save takes all
of them (``training._writable_dir``): ``StopAtSignal`` all-reduces the workers' flags at every
batch end, so all stop at the first batch end after any one of them was signalled.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import contextlib
import signal
import threading

import tensorflow as tf

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """Training stopped on signal ``signum``; ``step``: the step saved then, None if none was.

    A KeyboardInterrupt, so that code that cleans up after Ctrl-C cleans up after it too.
    """

    def __init__(self, signum: int, step: int = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step = int(signum), step


def signal_number(interrupt: KeyboardInterrupt) -> int:
    """The signal behind ``interrupt``: its own for ``Stopped``, SIGINT for a plain Ctrl-C."""
    return getattr(interrupt, "signum", int(signal.SIGINT))


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal number, the shell's convention: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + signal_number(interrupt)


class StopRequest:
    """What the handler records: the first stop signal, None until one came.

    ``deferred`` is True while a ``StopAtSignal`` callback looks at ``signum`` after every step;
    otherwise the handler raises ``Stopped`` itself.
    """

    def __init__(self, signums=STOP_SIGNALS):
        self.signums = tuple(int(s) for s in signums)
        self.signum = None
        self.deferred = False

    def handle(self, signum, frame):  # noqa: ARG002  (the signal module's handler signature)
        first = self.signum is None
        if first:
            self.signum = int(signum)
        if first and not self.deferred:
            raise Stopped(signum)
        if not first and signum == signal.SIGINT:
            raise Stopped(signum)  # Ctrl-C again: at once, without the save
        # Otherwise the step loop acts on it, or it is a repeat of a stop already under way.


@contextlib.contextmanager
def stop_on_signals(signums=STOP_SIGNALS):
    """Install ``StopRequest.handle`` for ``signums`` for the duration of the block; yields the
    request. A signal that is ignored (``nohup``, a background job) stays ignored; outside the
    main thread, where Python cannot install handlers, nothing changes."""
    request = StopRequest(signums)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in request.signums:
            handler = signal.getsignal(signum)
            if handler is not signal.SIG_IGN:
                previous[signum] = handler
                signal.signal(signum, request.handle)
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def worker_count(strategy) -> int:
    """Processes that train in lockstep: the chief and workers of the cluster, else 1."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def _summed_over_workers(strategy):
    """A function: float vector -> its sum over every replica of every worker (an all-reduce)."""
    @tf.function
    def summed(values):
        per_replica = strategy.run(tf.identity, args=(values,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return lambda values: summed(tf.constant(values, tf.float32)).numpy()


class StopAtSignal(tf.keras.callbacks.Callback):
    """At every batch end: if a stop signal came (to any worker), save the step and raise
    ``Stopped``. Raising, not ``stop_training``: Keras would validate the epoch first, which the
    grace period before SIGKILL may not allow.

    ``save()`` saves the current step and returns it, or returns None when it cannot (diverged
    weights, a full disk), in which case ``Stopped.step`` is None. ``strategy``: with several
    workers, their flags are summed over the cluster at every batch end (a few bytes).
    """

    def __init__(self, request: StopRequest, save, strategy=None):
        super().__init__()
        self.request, self.save = request, save
        self.summed = _summed_over_workers(strategy) if worker_count(strategy) > 1 else None

    def on_train_begin(self, logs=None):
        self.request.deferred = True

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_asked()

    def on_train_end(self, logs=None):
        self._stop_if_asked()  # a signal during the last validation: stop before the export
        self.request.deferred = False

    def _agreed_signal(self):
        local = self.request.signum
        if self.summed is None:
            return local
        counts = self.summed([float(local == s) for s in self.request.signums])
        if local is not None:
            return local
        return next((s for s, count in zip(self.request.signums, counts) if count > 0), None)

    def _stop_if_asked(self):
        signum = self._agreed_signal()
        if signum is None:
            return
        self.request.signum = signum  # a worker stopped by another's signal: its own is a repeat
        step = self.save()
        self.request.deferred = False
        raise Stopped(signum, step)
