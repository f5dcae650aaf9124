"""A command run in a fresh process as a user runs it, measured from outside: wall seconds from
start to exit, the process's own peak resident memory and CPU seconds (``os.wait4``), the load
average before and after (how quiet the machine was), and which files of a folder it opened
(``strace``, in a separate, unmeasured run).

Used by ``bench/cohort.py``; nothing here imports TensorFlow, so the measuring process stays small
and idle while a measured one runs.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import time

MIB = 1024  # ru_maxrss is in KiB on Linux


def run_measured(argv: list, log_prefix: str, *, env: dict = None, cwd: str = None,
                 settle_seconds: float = 0.0) -> dict:
    """Run ``argv`` to its exit after flushing written files to disk (``os.sync``) and
    ``settle_seconds`` of rest, so the previous run's write-back does not land in this one.

    Writes its stdout and stderr to ``log_prefix``.out / .err. Returns {'returncode', 'wall_s'
    (start to exit), 'cpu_s' (user + system), 'peak_rss_mib' (the process's own, with any child
    it waited for), 'load_start', 'load_end' (1/5/15-minute load averages), 'stdout', 'stderr'
    (the log paths)}.
    """
    os.sync()
    time.sleep(settle_seconds)
    load_start = os.getloadavg()
    with open(f"{log_prefix}.out", "w") as out, open(f"{log_prefix}.err", "w") as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    load_end = os.getloadavg()
    return {"returncode": process.returncode, "wall_s": round(wall, 3),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / MIB, 1),
            "load_start": [round(v, 2) for v in load_start],
            "load_end": [round(v, 2) for v in load_end],
            "stdout": f"{log_prefix}.out", "stderr": f"{log_prefix}.err"}


def last_line(path: str) -> str:
    """The last non-empty line of a log (a command's one-line error is its last)."""
    with open(path, errors="replace") as f:
        lines = [line.rstrip() for line in f if line.strip()]
    return lines[-1] if lines else ""


def line_count(path: str) -> int:
    with open(path, errors="replace") as f:
        return sum(1 for line in f if line.strip())


# openat(AT_FDCWD, "/path", O_RDONLY|O_CLOEXEC) = 3   (strace -f prefixes the thread id)
_OPEN = re.compile(r'open(?:at)?\((?:AT_FDCWD, )?"(?P<path>[^"]+)", (?P<flags>[A-Z_|0-9]+)'
                   r'.*\)\s+=\s+(?P<fd>-?\d+)')


def files_opened(argv: list, under: str, log_path: str, *, env: dict = None,
                 cwd: str = None) -> list:
    """The regular files below the folder ``under`` that ``argv`` opened successfully, relative
    to it, in first-opened order; None when strace is not installed. The run is traced
    (slower), so it is a separate run from the measured one."""
    if shutil.which("strace") is None:
        return None
    trace = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", log_path]
    fast = subprocess.run([*trace[:2], "--seccomp-bpf", *trace[2:], *argv], env=env, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if "seccomp" in fast.stderr and "unrecognized" in fast.stderr:  # an older strace
        subprocess.run([*trace, *argv], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    folder = os.path.realpath(under) + os.sep
    found = []
    with open(log_path, errors="replace") as f:
        for line in f:
            match = _OPEN.search(line)
            if not match or int(match["fd"]) < 0 or "O_DIRECTORY" in match["flags"]:
                continue
            path = os.path.realpath(match["path"])
            if path.startswith(folder) and os.path.relpath(path, folder) not in found:
                found.append(os.path.relpath(path, folder))
    return found


def machine() -> dict:
    """The CPU, its core count, Python and TensorFlow versions (without importing it)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        tensorflow = importlib.metadata.version("tensorflow")
    except importlib.metadata.PackageNotFoundError:
        tensorflow = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tensorflow}
