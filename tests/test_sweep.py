"""`hwgen sweep` on a two-node Ray cluster started here, on loopback, and shut down after."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from hwgen.boards import load_board
from hwgen.build import build_board
from hwgen.errors import UserError
from hwgen.fit import auto_folds, fit_folds
from hwgen.rtl.network import parse_folds
from hwgen.sweep import RESULTS_FILE, load_spec, read_rows, run_sweep
from helpers import random_model

# Ray uses 127.0.0.1 for its nodes with this set (see TOOLCHAIN.md), before it is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import psutil  # noqa: E402  (a dependency of ray)
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


SPEC = """
models = ["m.npz"]
boards = ["icebreaker", "ulx3s-85f"]
folds = ["auto", "4x8,2x4", "2x4,1x4"]
run = "synth"

[[points]]
model = "m.npz"
board = "icebreaker"
folds = "2x4,1x4"
run = "pnr"

[[points]]
model = "m.npz"
board = "icebreaker"
folds = "5x8,1x4"
"""


def kill_first_build_worker(stop: threading.Event, killed: list, folder) -> None:
    """Kill, once, the Ray worker that runs a place-and-route under ``folder`` (and the tools it
    started); builds of anything else on the machine are left alone."""
    while not stop.is_set() and not killed:
        for process in psutil.process_iter(["cmdline"]):
            if "build_top.sh" in " ".join(process.info["cmdline"] or []):
                try:
                    if not process.cwd().startswith(str(folder.resolve())):
                        continue
                    worker = process.parent()
                    tools = process.children(recursive=True)
                    worker.send_signal(signal.SIGKILL)
                    for tool in [process, *tools]:
                        tool.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    continue
                killed.append(worker.pid)
                return
        time.sleep(0.2)


def test_sweep_rows_rerun_failures_and_a_killed_worker(cluster, tmp_path):
    model = random_model(np.random.default_rng(12), [48, 24, 10])
    model.save(tmp_path / "m.npz")
    (tmp_path / "spec.toml").write_text(SPEC)
    points = load_spec(tmp_path / "spec.toml")
    assert len(points) == 3 * 2 + 2
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_first_build_worker, args=(stop, killed, tmp_path / "out"))
    killer.start()
    try:
        rows = run_sweep(points, tmp_path / "out", progress=False)
    finally:
        stop.set()
        killer.join()
    assert killed, "no place-and-route worker was seen to kill"
    assert len(rows) == len(points)
    assert len({row["node"] for row in rows}) == 2          # both nodes of the cluster ran points
    by = {(row["board"], row["folds"], row["run"]): row for row in rows}

    # Estimates and synthesis as the library gives them; both nodes took points.
    for board_name in ("icebreaker", "ulx3s-85f"):
        board = load_board(board_name)
        assert by[(board_name, "auto", "synth")]["fold_list"] == [str(f) for f in auto_folds(model, board).folds]
        for folds in ("4x8,2x4", "2x4,1x4"):
            row = by[(board_name, folds, "synth")]
            assert "error" not in row and row["attempt"] == 1
            assert row["estimate"] == fit_folds(model, parse_folds(folds, model), board).total.as_dict()
            assert row["synth"]["luts"] > 0 and row["ii"] == fit_folds(model, parse_folds(folds, model), board).cycles_per_image

    # The place-and-route point: its worker was killed once, the error recorded, the retry equal to hwgen build.
    pnr = by[("icebreaker", "2x4,1x4", "pnr")]
    assert pnr["attempt"] == 2 and "error" not in pnr
    logged = [row for row in read_rows(tmp_path / "out" / RESULTS_FILE) if row["key"] == pnr["key"]]
    assert [row["attempt"] for row in logged] == [1, 2] and "error" in logged[0]
    board = load_board("icebreaker")
    est = fit_folds(model, parse_folds("2x4,1x4", model), board)
    report = build_board(model, "m.npz", board, est.folds, tmp_path / "by-hand", est=est).report
    assert pnr["placed"] == {key: value["used"] for key, value in report["placed"].items()}
    assert pnr["fmax_mhz"] == report["fmax_mhz"]

    # A point that cannot be built is recorded (and tried once more) without stopping the others.
    bad = by[("icebreaker", "5x8,1x4", "synth")]
    assert bad["attempt"] == 2 and "PE=5 does not divide out_features=24" in bad["error"]

    # A rerun runs nothing it has: the results file only grows by the failed point's two tries.
    lines = len(read_rows(tmp_path / "out" / RESULTS_FILE))
    again = run_sweep(points, tmp_path / "out", progress=False)
    assert [row["key"] for row in again if "error" not in row] == [row["key"] for row in rows if "error" not in row]
    assert len(read_rows(tmp_path / "out" / RESULTS_FILE)) == lines + 2
    table = (tmp_path / "out" / "results.md").read_text()
    assert "Best on icebreaker" in table and "Best on ulx3s-85f" in table
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0


@pytest.mark.parametrize("spec, message", [
    ('models = ["m.npz"]\nboards = ["nope"]\nfolds = ["auto"]\n', r"bad.toml: board 'nope' is not one of"),
    ('models = ["x.npz"]\nboards = ["icebreaker"]\nfolds = ["auto"]\n', r"bad.toml: model 'x.npz': no such file"),
    ('models = ["m.npz"]\nboards = ["icebreaker"]\nfolds = ["fps:0"]\n',
     r"folds 'fps:0': write fps:N with N images/s above 0"),
    ('modles = []\n', r"unknown field\(s\) modles"),
    ('models = ["m.npz"]\nboards = ["icebreaker"]\nfolds = ["auto"]\nrun = "fly"\n',
     r"run 'fly' is not one of estimate, synth, pnr"),
    ('models = ["m.npz"]\nboards = ["icebreaker"]\nfolds = ["auto"]\n[[points]]\nmodel = "m.npz"\n'
     'board = "icebreaker"\nfolds = "auto"\nseeds = 0\n',
     r"bad.toml: points\[0\]\.seeds must be a number of placer seeds \(1 or more\), not 0"),
])
def test_sweep_spec_errors(tmp_path, spec, message):
    (tmp_path / "m.npz").write_bytes(b"")
    (tmp_path / "bad.toml").write_text(spec)
    with pytest.raises(UserError, match=message):
        load_spec(tmp_path / "bad.toml")


def test_verify_shards_a_test_set_over_the_cluster(cluster, tmp_path):
    """`hwgen verify --address`: the same summary as on local processes, the chunks run as Ray tasks."""
    import subprocess
    import sys

    model = random_model(np.random.default_rng(13), [64, 32, 10])
    model.save(tmp_path / "d.npz")
    command = [sys.executable, "-m", "hwgen.cli", "verify", str(tmp_path / "d.npz"), "--dataset", "digits",
               "--images", "400", "--fold", "4x16,2x8"]
    local = subprocess.run(command + ["--build-dir", str(tmp_path / "local")], capture_output=True, text=True)
    sharded = subprocess.run(command + ["--build-dir", str(tmp_path / "ray"), "--address", cluster.address],
                             capture_output=True, text=True)
    assert local.returncode == 0 and sharded.returncode == 0, sharded.stderr[-2000:]
    head = [line for line in local.stdout.splitlines() if line.startswith(("images:", "cycles per image:"))]
    assert head[0].startswith("images: 400, mismatches: 0 images")
    assert head == [line for line in sharded.stdout.splitlines() if line.startswith(("images:", "cycles per image:"))]
    assert len(list((tmp_path / "ray" / "batch" / "runs").iterdir())) == 8        # jobs 2 x 4 chunks
