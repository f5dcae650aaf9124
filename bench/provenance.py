"""What produced a benchmark result, and how it is written: shared by every bench.

Benchmarks run from the repository's root as modules (``python -m bench.accuracy ...``). Results
record the command as anyone would rerun it (``portable``): paths inside the repository relative to
it, the data folder as ``$LTNET_DATA_DIR``; folders of one machine (trained run folders, scratch)
are named by their role in the result (``RUN``), never by their path.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The benchmark data (../shared/data beside the repository, see its README); LTNET_DATA_DIR
# points elsewhere.
DATA_DIR = os.environ.get("LTNET_DATA_DIR") or os.path.normpath(
    os.path.join(ROOT, "..", "shared", "data"))


def portable(text: str) -> str:
    """``text`` with this machine's paths replaced: the data folder -> $LTNET_DATA_DIR, the
    repository -> a relative path."""
    text = str(text)
    text = text.replace(os.path.abspath(DATA_DIR), "$LTNET_DATA_DIR")
    text = text.replace(ROOT + os.sep, "").replace(ROOT, ".")
    return text


def command_line() -> str:
    """``python -m bench.<name> <arguments>`` for the running benchmark, portable."""
    module = os.path.splitext(os.path.relpath(os.path.abspath(sys.argv[0]), ROOT))[0]
    return portable(" ".join(["python", "-m", module.replace(os.sep, "."), *sys.argv[1:]]))


def git_commit() -> str:
    """HEAD, with '-dirty' when tracked files differ from it (results being written under
    bench/results/ do not count: they are outputs, not code); 'unknown' outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)bench/results"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(payload: dict, path: str) -> None:
    """A results file, written under a temporary name and renamed: never half a file."""
    from ltnet_tf.files import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
