"""What every command line shares: parsing absl flags into their own ``FlagValues``, ``--help``,
INFO lines of ltnet_tf only, and the rule that a user's error is one line and exit status 1 while
a bug keeps its traceback.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import atexit
import logging as pylogging
import os
import re
import sys

from absl import flags, logging

from ltnet_tf.config import ConfigError
from ltnet_tf.errors import DataError


def parse(flag_values: flags.FlagValues, argv, usage: str):
    """Parse argv; returns None after printing help (then exit 0)."""
    argv = list(argv if argv is not None else sys.argv)
    if not argv or argv[0].startswith("-"):  # library call with flags only: no program name
        argv.insert(0, "ltnet")
    if any(a in ("--help", "--helpfull", "-h", "--helpshort") for a in argv[1:]):
        print(usage)
        print(flag_values.get_help())
        return None
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(rest[1:])}")
    return flag_values


def user_error(error: Exception):
    """The one-line message of an error caused by the user's input, or None for a bug."""
    if isinstance(error, (ConfigError, DataError)):  # a busy output folder: said before TF loads
        return str(error)
    # Imported here, not at the top: --helpfull and flag errors must not wait for TensorFlow.
    from ltnet_tf.serving.modeldir import ModelDirError
    from ltnet_tf.training.callbacks import TrainingError
    import tensorflow as tf

    if isinstance(error, (ModelDirError, TrainingError)):
        return str(error)
    if isinstance(error, tf.errors.OpError):
        # A scan that turned bad while tf.data was reading it: TF wraps our DataError in its own
        # error, with the Python traceback in the message; keep our line.
        found = re.search(r"\bDataError: ([^\n]+)", str(error))
        if found:
            return found.group(1).strip()
    return None


# ltnet_tf/ (this file is in ltnet_tf/commands/): every layer's INFO lines pass.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class _LtnetInfoOnly(pylogging.Filter):
    """absl INFO records from ltnet_tf pass; TensorFlow's own INFO chatter (checkpoint sharding,
    SavedModel tensor renaming, fingerprints) would bury the progress lines."""

    def filter(self, record):
        return (record.levelno >= pylogging.WARNING
                or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


_INFO_FILTER = _LtnetInfoOnly()


def define_verbose_flag(flag_values: flags.FlagValues) -> None:
    # Read from sys.argv by ltnet_tf.compat before TensorFlow is imported; defined here for --help.
    flags.DEFINE_bool("verbose", False, "Show TensorFlow's start-up and C++ log lines (CUDA, "
                      "oneDNN); also shown when TF_CPP_MIN_LOG_LEVEL is set.",
                      flag_values=flag_values)


def exit_now(status: int) -> None:
    """End a command's process with ``status``: exit handlers run and output flushed, but not the
    interpreter's teardown of every module (TensorFlow, Keras, SciPy: ~1 s on 2 cores, after the
    last file was written and renamed). For the command-line scripts only; a library call
    returns."""
    atexit._run_exitfuncs()  # noqa: SLF001  (what sys.exit would run, logging's flush included)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_command(body, flag_values, argv, usage, program: str = "") -> int:
    """Parse, run ``body``; a user's error is one line ``[program: ]error: ...`` and status 1."""
    try:
        parsed = parse(flag_values, argv, usage)
        if parsed is None:
            return 0
        logging.set_verbosity(logging.INFO)
        if _INFO_FILTER not in logging.get_absl_logger().filters:
            logging.get_absl_logger().addFilter(_INFO_FILTER)
        return body(parsed)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (re-raised unless it is the user's input)
        message = user_error(e)
        if message is None:
            raise
        first_line = (message.strip().splitlines() or [type(e).__name__])[0]
        print(f"{program + ': ' if program else ''}error: {first_line}", file=sys.stderr)
        return 1
