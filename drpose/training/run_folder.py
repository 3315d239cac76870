"""One output folder, one run: a lock that names its holder, and no silent start over another run's files.

``<output_dir>/run.lock`` is held (an exclusive ``flock``) by the process that trains there (rank 0) and
holds its host, pid and start time. A second run on the folder is refused, naming the holder. A lock left
by a process that died without releasing it (SIGKILL, a lost machine) is stale: on the same host it is
taken over when that process is gone; from another host it is refused with the holder named, since only
that host can tell whether the run still goes (delete the file once it does not).

A folder that holds a run's files (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``lora/``,
``summary.json``, ``tensorboard/``) is refused without ``--resume`` (continue it) or ``--overwrite``
(delete those files and start again), naming what is there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .config import ConfigError

LOCK = "run.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "lora", "checkpoints", "tensorboard")
"""What a run writes into its output folder (and ``--overwrite`` deletes)."""


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid from its first owner;
    None where /proc cannot tell (or the process does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    return start is None or now is None or now == start


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "a process that left no details"
    since = f", since {holder['started']}" if holder.get("started") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{since}"


class RunLock:
    """The exclusive lock on ``folder`` (see the module docstring); :meth:`release` gives it back."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.note: str | None = None
        self.stale: dict | None = None  # the holder of a stale lock taken over
        self._fd = self._acquire()

    def _acquire(self) -> int:
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise ConfigError(f"run.output_dir: {self.path.parent} is in use by another run "
                                  f"({describe_holder(holder)}; lock {self.path}); wait for it to end or stop it, or "
                                  f"choose another run.output_dir")
            try:  # the holder before us may have deleted the file between our open and our lock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise ConfigError(f"run.output_dir: could not lock {self.path} (it keeps being replaced)")
        try:
            previous = os.pread(fd, 4096, 0).decode(errors="replace") if os.fstat(fd).st_size else None
            self._check_previous(_holder(previous) if previous is not None else None)
        except ConfigError:
            os.close(fd)
            raise
        me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        return fd

    def _check_previous(self, holder: dict | None) -> None:
        """A lock file whose holder did not release it: stale, unless that process may still run."""
        if holder is None:
            return
        host, pid = holder.get("host"), holder.get("pid")
        if host != socket.gethostname() or not isinstance(pid, int):
            raise ConfigError(
                f"run.output_dir: {self.path.parent} is locked by {describe_holder(holder)} (lock {self.path}); this "
                f"machine ({socket.gethostname()}) cannot tell whether that run still goes: if it does not, delete "
                f"{self.path}")
        if pid != os.getpid() and process_alive(pid, holder.get("process_start")):
            raise ConfigError(f"run.output_dir: {self.path.parent} is in use by another run "
                              f"({describe_holder(holder)}, still running; lock {self.path}); wait for it to end or "
                              f"stop it, or choose another run.output_dir")
        self.stale = holder
        self.note = f"took over the stale lock {self.path} of {describe_holder(holder)} (no longer running)"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def run_contents(folder: Path) -> str | None:
    """What of a run ``folder`` holds, in words (None when nothing): finished or started, and its files."""
    present = [name for name in RUN_FILES if (folder / name).exists()]
    if not present:
        return None
    parts = []
    if "checkpoints" in present:
        steps = sorted(int(p.name.split("-", 1)[1]) for p in (folder / "checkpoints").glob("checkpoint-*")
                       if p.name.split("-", 1)[1].isdigit())
        parts.append(f"checkpoints at steps {', '.join(map(str, steps))}" if steps else "checkpoints/ (no checkpoint)")
    if "metrics.jsonl" in present:
        lines = [line for line in (folder / "metrics.jsonl").read_text(errors="replace").splitlines() if line.strip()]
        try:
            last = json.loads(lines[-1])["step"] if lines else None
        except (ValueError, KeyError, TypeError):
            last = "?"
        parts.append(f"metrics.jsonl up to step {last}" if last is not None else "an empty metrics.jsonl")
    parts += [f"{name}/" if (folder / name).is_dir() else name for name in present
              if name not in ("checkpoints", "metrics.jsonl")]
    kind = "a finished run" if "summary.json" in present else "a started run"
    return f"{kind} ({'; '.join(parts)})"


def claim(folder: str | Path, resume: bool, overwrite: bool) -> tuple[RunLock, str | None]:
    """Lock ``folder`` for this run and check what it holds: (the lock, what was there before, in words).

    Without ``resume`` a folder holding a run is refused, unless ``overwrite``, which deletes that run's files."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in run.output_dir, or "
                          "delete it and start again")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = RunLock(folder)
    except OSError as error:
        raise ConfigError(f"run.output_dir: cannot create or lock {folder} ({error})") from error
    contents = run_contents(folder)
    if contents and not resume:
        if not overwrite:
            lock.release()
            raise ConfigError(f"run.output_dir: {folder} holds {contents}; continue it with --resume latest, delete it "
                              f"and start again with --overwrite, or choose another run.output_dir")
        for name in RUN_FILES:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        lock.note = "; ".join(filter(None, [lock.note, f"--overwrite: deleted {contents} in {folder}"]))
    return lock, contents
