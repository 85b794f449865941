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
import pytest

from helpers import random_model
from hwgen.process import folder_lock

HWGEN = [sys.executable, "-m", "hwgen.cli"]


def commands_under(folder: Path) -> list[str]:
    """Command lines of the live processes whose working folder lies under ``folder`` (the tools of a build
    run in its staging folder). A tool that has just exited and is not yet reaped is a zombie with no
    command line; it counts as ended."""
    found = []
    for process in psutil.process_iter(["cwd", "cmdline", "status"]):
        cwd, cmdline = process.info.get("cwd"), process.info.get("cmdline")
        if (cwd and cmdline and process.info.get("status") != psutil.STATUS_ZOMBIE
                and Path(cwd).is_relative_to(folder)):
            found.append(" ".join(cmdline))
    return found


@pytest.mark.parametrize("tool, options, count", [("yowasp", [], 1), ("yowasp-nextpnr", ["--seeds", "2"], 2)],
                         ids=["yosys", "nextpnr-per-seed"])
def test_sigterm_during_build_ends_its_tools_and_removes_staging(tmp_path, tool, options, count):
    """SIGTERM while the build's yosys runs, or while its two seeds' nextpnr run side by side:
    every tool ends, nothing is left in the folder."""
    random_model(np.random.default_rng(4), [64, 32, 10]).save(tmp_path / "model.npz")
    build = subprocess.Popen([*HWGEN, "build", "model.npz", "--board", "icebreaker", "--fold", "auto", *options,
                              "-o", "out"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (len([c for c in commands_under(tmp_path) if tool in c]) < count
           and build.poll() is None):
        # waiting for the tools (in the staging folder or, per seed, below it)
        assert time.monotonic() < deadline, "the build's tools never started"
        time.sleep(0.2)
    assert build.poll() is None, build.communicate()
    assert any(p.name.startswith(".out.") for p in tmp_path.iterdir())          # the staging folder exists now
    build.send_signal(signal.SIGTERM)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == 143
    assert stderr.strip().splitlines()[-1] == "terminated (SIGTERM)"
    assert "Traceback" not in stderr
    assert commands_under(tmp_path) == []
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


def descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def command_lines(processes: list[psutil.Process]) -> str:
    """The command lines of those of ``processes`` still running, one per line."""
    lines = []
    for process in processes:
        try:
            lines.append(" ".join(process.cmdline()))
        except psutil.Error:
            continue
    return "\n".join(lines)


def terminate_when(process: subprocess.Popen, ready, what: str,
                   timeout: float = 300) -> tuple[list[psutil.Process], str]:
    """SIGTERM ``process`` once ``ready()`` holds; returns the processes below it at that moment
    and their command lines."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{what} never started"
        time.sleep(0.1)
    below = descendants(process)
    commands = command_lines(below)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated (SIGTERM)" and "Traceback" not in stderr
    return below, commands


def assert_all_ended(processes: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 15
    def alive(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    while [p for p in processes if alive(p)]:
        assert time.monotonic() < deadline, command_lines([p for p in processes if alive(p)])
        time.sleep(0.2)


def test_sigterm_during_sim_ends_the_verilator_build_and_a_rerun_builds_again(tmp_path):
    """The Verilator build inside cocotb's runner (make and the compilers are its children) ends
    with hwgen; the unfinished build is not taken for a finished one."""
    random_model(np.random.default_rng(4), [64, 32, 10]).save(tmp_path / "model.npz")
    command = [*HWGEN, "sim", "model.npz", "--dataset", "digits", "--images", "8", "--build-dir", "simdir"]
    sim = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    below, commands = terminate_when(sim, lambda: "cc1plus" in command_lines(descendants(sim)), "the C++ compiler")
    assert "cc1plus" in commands and "verilated" in commands
    assert_all_ended(below)
    assert commands_under(tmp_path) == []
    assert not list(tmp_path.glob("simdir/**/design.sha256"))        # no build marked finished
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "RTL vs golden: 8/8 images bit-exact" in again.stdout, again.stderr


def test_sigterm_during_export_writes_nothing(tmp_path):
    import torch
    from hwgen.frontends.templates import Architecture, build_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model(Architecture((8, 8), (32,), 10, "binary")), {"dataset": "digits"})
    export = subprocess.Popen([*HWGEN, "export", "m.pt", "-o", "out/m.npz"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def working() -> bool:          # torch is loaded: the checkpoint is being read or exported
        try:
            return "libtorch_cpu" in Path(f"/proc/{export.pid}/maps").read_text()
        except OSError:
            return False
    assert_all_ended(terminate_when(export, working, "the export")[0])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.pt"]


SWEEP_SPEC = """
models = ["m.npz"]
boards = ["icebreaker"]
folds = ["2x4,1x4"]
run = "pnr"
"""


def test_sigterm_during_sweep_ends_ray_and_its_builds(tmp_path):
    random_model(np.random.default_rng(12), [48, 24, 10]).save(tmp_path / "m.npz")
    (tmp_path / "spec.toml").write_text(SWEEP_SPEC)
    sweep = subprocess.Popen([*HWGEN, "sweep", "spec.toml", "-o", "out", "--workers", "1"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    building = lambda: any("build_top.sh" in c for c in commands_under(tmp_path / "out"))  # noqa: E731
    below, commands = terminate_when(sweep, building, "the sweep's place and route")
    assert "raylet" in commands and "build_top.sh" in commands
    assert_all_ended(below)
    assert commands_under(tmp_path) == []
    assert [p.name for p in (tmp_path / "out" / "builds").iterdir() if p.name.startswith(".")] == []
    for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines() if (tmp_path / "out" / "results.jsonl").exists() else []:
        assert line.startswith("{") and line.endswith("}")
