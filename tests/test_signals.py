"""Stopping training on a signal (ltnet_tf.training.signals), with real processes and real signals.

A cluster scheduler ends a job with SIGTERM, then SIGKILL after a grace period. ``python train.py``
is started as a child process on tiny data with many steps; once it trained past a checkpoint it is
sent SIGTERM, and must save the step it reached, say so in one line, exit 143, and ``--resume``
must continue from exactly that step: the resumed run ends with the weights of a run that was never
stopped. Under MultiWorkerMirroredStrategy, a signal to one worker stops both at the same step.

The data (conftest.py) and helpers (helpers.py) are the command-line tests'; the two workers are
``test_distribute``'s.
"""
import json
import logging as pylogging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from ltnet_tf.commands import cli
from ltnet_tf.serving.modeldir import ModelDir
from ltnet_tf.training import signals, trainer as training
from helpers import REPO, SUBPROCESS_TIMEOUT, read_checkpoint_iterations, train_argv
from test_distribute import (_assert_same_training, _checkpoint, _env, _free_ports,
                             _train_argv as distributed_argv)

import tensorflow as tf  # noqa: E402  (after ltnet_tf, which selects Keras 2)

pytestmark = pytest.mark.slow  # training stopped by signals in fresh processes (CI runs -m slow too)

EVERY = 3
MANY_STEPS = 100000  # never reached: the run only ends on the signal (or the deadline)


class Training:
    """``python train.py ARGV`` as a child process in its own session, stderr collected by a thread
    line by line (so a test can act on a log line as it appears)."""

    def __init__(self, argv, env=None, log_path=None):
        env = env or {**os.environ, "PYTHONPATH": REPO}
        self.lines, self.log_path = [], log_path
        self.process = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *argv],
                                        cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_until(self, condition, what: str, timeout=SUBPROCESS_TIMEOUT):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"training ended (exit {self.process.returncode}) before {what}\n"
                            + self.tail())
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout} s\n" + self.tail())
            time.sleep(0.02)

    def wait(self, timeout=SUBPROCESS_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s after the signal (hung?)\n" + self.tail())
        finally:
            self.kill()
            self.reader.join(timeout=10)

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def tail(self, count=25) -> str:
        return "\n".join(self.lines[-count:])


def checkpoint_steps(checkpoint_dir) -> list:
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(int(name[len("ckpt-"):-len(".index")]) for name in os.listdir(checkpoint_dir)
                  if name.startswith("ckpt-") and name.endswith(".index"))


def has_checkpoint(model_dir: ModelDir):
    return lambda: tf.train.latest_checkpoint(model_dir.checkpoint_dir) is not None


def the_stop_line(stderr: str, start: str) -> str:
    """The one line that starts with ``start``; nothing that looks like a crash."""
    lines = [line for line in stderr.splitlines() if line.startswith(start)]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not [line for line in stderr.splitlines() if line.startswith("error:")], stderr[-3000:]
    return lines[0]


def saved_step(line: str, how: str) -> int:
    found = re.fullmatch(rf"{re.escape(how)} at step (\d+): saved ckpt-\1; continue from it with "
                         r"python train\.py --resume --model_dir (\S+) \(and the same data flags\)",
                         line)
    assert found, line
    return int(found.group(1))


# ------------------------------------------------------------------------------- one process
def test_sigterm_saves_the_step_reached_and_resume_continues_from_it(dataset, tmp_path, caplog):
    model_dir = ModelDir(str(tmp_path / "run"))
    run = Training(train_argv(dataset, model_dir.path, f"--steps={MANY_STEPS}",
                              f"--checkpoint_every={EVERY}", "--noexport")[1:])
    run.wait_until(has_checkpoint(model_dir), "checkpoint")
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM
    line = the_stop_line(run.stderr(), "terminated")
    step = saved_step(line, "terminated (SIGTERM)")
    assert model_dir.path in line
    # The checkpoint was seen after step EVERY's batch end; the signal is acted on at a later one.
    assert step > EVERY
    last = os.path.join(model_dir.checkpoint_dir, f"ckpt-{step}")
    assert tf.train.latest_checkpoint(model_dir.checkpoint_dir) == last
    assert read_checkpoint_iterations(last) == step
    assert checkpoint_steps(model_dir.checkpoint_dir)[-1] == step  # nothing saved after it

    with caplog.at_level(pylogging.INFO):
        assert cli.train_main(train_argv(dataset, model_dir.path, "--resume",
                                         f"--steps={step + 2}", "--noexport")) == 0
    assert any(f"at step {step} from {last}" in r.getMessage() for r in caplog.records)
    assert read_checkpoint_iterations(model_dir.checkpoint("last")) == step + 2

    # No step lost or repeated, the data order continued: the weights and Adam states of a run
    # that trained step + 2 steps without a stop.
    straight = ModelDir(str(tmp_path / "straight"))
    assert cli.train_main(train_argv(dataset, straight.path, f"--steps={step + 2}",
                                     f"--checkpoint_every={EVERY}", "--noexport")) == 0
    resumed, expected = (_checkpoint(path, step + 2) for path in (model_dir.path, straight.path))
    for counts in (resumed, expected):  # how many saves it took: one more for the stopped run
        del counts["save_counter/.ATTRIBUTES/VARIABLE_VALUE"]
    _assert_same_training(resumed, expected)


def test_sigterm_outside_the_step_loop_names_the_checkpoint_to_resume_from(dataset, tmp_path):
    """SIGTERM once training is over and the export has begun: nothing new to save, no
    half-written SavedModel, and --resume only exports."""
    model_dir = ModelDir(str(tmp_path / "run"))
    run = Training(train_argv(dataset, model_dir.path, "--steps=2", "--checkpoint_every=2")[1:])
    run.wait_until(lambda: any("trained 2 steps" in line for line in run.lines), "end of training")
    run.process.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM
    line = the_stop_line(run.stderr(), "terminated")
    assert line == (f"terminated (SIGTERM), nothing saved after ckpt-2: continue from it with "
                    f"python train.py --resume --model_dir {model_dir.path} (and the same data "
                    f"flags)")
    assert model_dir.saved_model_versions() == []
    assert not os.path.isdir(model_dir.saved_model_base) or os.listdir(
        model_dir.saved_model_base) == []

    assert cli.train_main(train_argv(dataset, model_dir.path, "--resume")) == 0
    assert model_dir.saved_model_versions() == [1]
    assert os.path.isfile(model_dir.generator_h5_path)


def test_stop_message_before_the_first_checkpoint(tmp_path):
    line = training.stopped_message(ModelDir(str(tmp_path / "run")),
                                    signals.Stopped(signal.SIGTERM))
    assert line == f"terminated (SIGTERM) before the first checkpoint of {tmp_path / 'run'}: " \
                   f"nothing to resume"
    assert signals.exit_code(signals.Stopped(signal.SIGTERM)) == 143
    assert signals.exit_code(KeyboardInterrupt()) == 130


# ------------------------------------------------------------------------------- the handler
def deliver(signum):
    """Send ``signum`` to this process; Python runs the handler at the main thread's next
    bytecode, which the sleeps give it."""
    os.kill(os.getpid(), signum)
    for _ in range(50):
        time.sleep(0.01)


def test_handlers_are_restored_and_an_ignored_signal_stays_ignored():
    before = signal.getsignal(signal.SIGTERM)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        with signals.stop_on_signals() as request:
            assert signal.getsignal(signal.SIGTERM) == request.handle
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            deliver(signal.SIGINT)
            assert request.signum is None
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous_int)


def test_outside_the_step_loop_a_signal_stops_at_once():
    with pytest.raises(signals.Stopped) as stopped:
        with signals.stop_on_signals():
            deliver(signal.SIGTERM)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.step is None


def test_second_ctrl_c_stops_at_once_without_the_save():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with signals.stop_on_signals() as request:
            request.deferred = True  # what StopAtSignal sets while the step loop runs
            deliver(signal.SIGINT)  # the first: recorded for the step loop, no exception
            assert request.signum == signal.SIGINT
            deliver(signal.SIGTERM)  # a stop already under way: nothing more
            with pytest.raises(signals.Stopped) as stopped:
                deliver(signal.SIGINT)
        assert stopped.value.signum == signal.SIGINT and stopped.value.step is None
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------- two workers
@pytest.fixture(scope="module")
def distributed_data(tmp_path_factory):
    from ltnet_tf.commands.synthetic import make_demo_dataset

    return make_demo_dataset(str(tmp_path_factory.mktemp("data")), n_scans=4, shape=(16, 16, 16))


def test_sigterm_to_one_worker_stops_both_at_the_same_saved_step(distributed_data, tmp_path):
    """Worker 1 alone is signalled: the workers' flags are all-reduced at every batch end, so the
    chief stops at the same step and both take part in its save. Without that, the chief would wait
    forever in the next step's all-reduce (here: until the test's deadline)."""
    run = tmp_path / "run"
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    worker_tmp = [tmp_path / f"worker{i}_tmp" for i in range(2)]
    processes = [Training(distributed_argv(distributed_data, run, MANY_STEPS, "multi_worker"),
                          env=_env(worker_tmp[i], {"cluster": {"worker": workers},
                                                   "task": {"type": "worker", "index": i}}))
                 for i in range(2)]
    try:
        processes[0].wait_until(has_checkpoint(ModelDir(str(run))), "checkpoint",
                                timeout=2 * SUBPROCESS_TIMEOUT)
        processes[1].process.send_signal(signal.SIGTERM)
        exit_codes = [p.wait(timeout=60) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert exit_codes == [143, 143], [p.tail() for p in processes]
    steps = [saved_step(the_stop_line(p.stderr(), "terminated"), "terminated (SIGTERM)")
             for p in processes]
    assert steps[0] == steps[1] > 2, steps
    saved = os.path.join(run, "checkpoints", f"ckpt-{steps[0]}")
    assert read_checkpoint_iterations(saved) == steps[0]
    assert checkpoint_steps(os.path.join(run, "checkpoints"))[-1] == steps[0]
    assert os.listdir(worker_tmp[1]) == []  # worker 1's copy of the save was removed at exit
    with open(run / "config.json") as f:
        assert json.load(f)["steps"] == MANY_STEPS
