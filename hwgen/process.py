"""External tools and interruption: every tool hwgen starts ends when hwgen is stopped.

A tool (yosys, nextpnr, Verilator) runs in a process group of its own, so that ending it ends
the processes it started too (``build_top.sh`` runs yosys, then nextpnr). If hwgen is
interrupted while it waits (Ctrl-C, or SIGTERM, which :func:`exit_on_sigterm` turns into an
exception), the group is sent SIGTERM, then SIGKILL after a grace period, before the exception
goes on up to the code that removes the staging folders.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

__all__ = ["Terminated", "exit_on_sigterm", "end_children", "run_tool", "run_tools_together", "folder_lock"]

#: Seconds a tool's group has between SIGTERM and SIGKILL.
GRACE_SECONDS = 5.0


class Terminated(BaseException):
    """hwgen received SIGTERM (a ``BaseException``, like ``KeyboardInterrupt``, so that no
    ``except Exception`` swallows it on its way to the clean-up)."""


def _raise_terminated(signum, frame) -> None:
    end_children()
    raise Terminated()


def _raise_interrupt(signum, frame) -> None:
    end_children()
    raise KeyboardInterrupt()


def exit_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` and SIGINT ``KeyboardInterrupt`` in the main thread,
    each after SIGTERM to every process below this one. That has to come first: a library's own
    clean-up on the way up (``subprocess.run`` kills its child) would orphan the grandchildren
    (cocotb's ``make`` and compilers), and an orphan is no longer found below this process."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, _raise_interrupt)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # a process of the group that is no longer ours to signal
        return True
    return True


def _end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the tool's process group, SIGKILL to what is left of it after the grace period;
    returns once no process of the group remains (the group leader may exit before its children)."""
    group = process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline:
            process.poll()              # reap the leader, so that it does not linger as a zombie
            if not _group_alive(group):
                break
            time.sleep(0.05)
        else:
            continue
        break
    process.wait()


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux ``/proc``; elsewhere none), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        below = [child for pid in frontier for child in children.get(pid, [])]
        found += below
        frontier = below
    return found


def end_children() -> None:
    """SIGTERM to every process below this one, children and theirs: the processes libraries
    started on their own (Amaranth's yosys for Verilog output, which an interruption leaves
    waiting on a pipe; cocotb's Verilator build, whose make and compilers are its children; a
    local Ray's daemons and workers). Twice, for a process that was starting one meanwhile."""
    for _ in range(2):
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def run_tool(args: Sequence[str], *, cwd: Path | str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` to completion in a process group of its own, capturing its text output.

    If this process is interrupted while it waits, the tool's group is ended before the
    interruption goes on (tools started by tools included).
    """
    process = subprocess.Popen(list(args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        _end_group(process)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_tools_together(commands: Sequence[tuple[Sequence[str], Path]], *, jobs: int,
                       env: dict[str, str] | None = None, poll_seconds: float = 0.5) -> list[int]:
    """Run each ``(args, cwd)`` of ``commands``, at most ``jobs`` at a time, each in a process group
    of its own with its standard output and error in ``cwd / "tool.log"``; returns their exit codes
    in the order given.

    If this process is interrupted while it waits, every running tool's group is ended before the
    interruption goes on, and no further tool is started.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs!r}")
    codes: list[int | None] = [None] * len(commands)
    running: dict[int, subprocess.Popen] = {}
    waiting = list(range(len(commands)))
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                index = waiting.pop(0)
                args, cwd = commands[index]
                with open(Path(cwd) / "tool.log", "w") as log:
                    running[index] = subprocess.Popen(list(args), cwd=cwd, env=env, stdout=log,
                                                      stderr=subprocess.STDOUT, start_new_session=True)
            for index, process in list(running.items()):
                if process.poll() is not None:
                    codes[index] = process.returncode
                    del running[index]
            if running:
                time.sleep(poll_seconds)
    except BaseException:
        for process in running.values():
            _end_group(process)
        raise
    return [int(code) for code in codes]


@contextmanager
def folder_lock(output: Path) -> Iterator[None]:
    """Hold ``output``'s lock for the block, or refuse at once with a :class:`UserError` if another
    hwgen process holds it: two builds into one folder would replace each other's files half-way.

    The lock is a hidden file beside ``output``, removed when the block ends. A lock taken on a
    file that another process has just removed is let go and taken again on the new file.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_path = output.parent / f".{output.name}.lock"
    while True:
        lock = open(lock_path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise UserError(f"{output}: another hwgen process is writing this folder; wait for it to finish "
                            "or choose another -o") from None
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        lock.close()
