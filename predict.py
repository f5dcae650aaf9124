import signal
import sys


def _stopped_while_starting(signum, frame):  # noqa: ARG001
    """SIGTERM before predict.py's own handling starts (Python importing TensorFlow): one line, 143;
    nothing has been written yet."""
    print(f"predict.py stopped by {signal.Signals(signum).name} while starting: nothing was "
          f"written; run the same command again", file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == "__main__":  # not in the jobs of --jobs N (spawned, they import this file too)
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    from ltnet_tf.commands.cli import predict_entry

    predict_entry()
