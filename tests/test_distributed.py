"""Two training ranks on the CPU (gloo), launched as a user does: ``accelerate launch --cpu --num_processes 2
-m prefcurate.training.trainer ...``. Real tiny pipeline (16 px, 4x4 latents), 2 pairs per rank per step, a few
steps."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.snapshot_fixture import write_test_snapshot
from prefcurate.training.components import build_tiny_pipeline
from prefcurate.training.preflight import cpu_launch_num_processes


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    return {"snapshot": write_test_snapshot(root / "snapshot", n_pairs=8, n_shards=2, row_group_size=3),
            "model": build_tiny_pipeline(root / "model", resolution=16), "root": root}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(assets, output: Path, *extra: str, processes: int = 2, timeout: int = 300):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "prefcurate.training.trainer",
           "--snapshot", str(assets["snapshot"]), "--model", str(assets["model"]), "--output", str(output),
           "--loss", "dpo", "--train-batch-size", "2", "--learning-rate", "1e-3", "--checkpoint-every", "2",
           "--cache-dir", str(assets["root"] / "cache"), "--report-to", "none", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - t0


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(assets) -> Path:
    """4 uninterrupted steps on 2 ranks, a checkpoint every 2."""
    out = assets["root"] / "straight"
    done, _ = launch(assets, out, "--max-steps", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_accelerate_cpu_launch_runs_two_ranks_and_reduces_metrics(assets, straight):
    ran = json.loads((straight / "train_config.json").read_text())
    assert ran["world_size"] == 2 and ran["distributed_type"] == "MULTI_CPU" and ran["resolution"] == 16
    log = metrics(straight)
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # rank 0 alone writes, once per step
    assert all(r["pairs"] == 4 for r in log)  # 2 pairs on each of 2 ranks
    # step 1: LoRA B = 0, so policy = reference and each rank's loss is ln 2 x the mean curated weight of its
    # own 2 pairs; the logged loss is the mean over both ranks = ln 2 x the mean over the 4-pair global batch
    from prefcurate.training.snapshot_reader import PairStream, open_snapshot
    snap = open_snapshot(assets["snapshot"])
    ranks = [next(PairStream(snap, batch_size=2, resolution=16, seed=0, decode_images=False, rank=r,
                             world_size=2).batches()) for r in (0, 1)]
    assert not set(ranks[0].pair_ids) & set(ranks[1].pair_ids)  # each rank its own pairs
    per_rank = [math.log(2) * float(b.weight.mean()) for b in ranks]
    assert per_rank[0] != pytest.approx(per_rank[1])  # so rank 0's own loss would be caught
    assert log[0]["loss"] == pytest.approx(np.mean(per_rank), abs=1e-6)
    ckpt = straight / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["lora.safetensors", "rank-00000.pt", "rank-00001.pt",
                                                       "state.pt"]


def test_two_rank_resume_gives_the_same_loss_trajectory(assets, straight):
    out = assets["root"] / "resumed"
    done, _ = launch(assets, out, "--max-steps", "4", "--resume-from",
                     str(straight / "checkpoints" / "step-00000002"))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, uninterrupted = [r["loss"] for r in metrics(out)], [r["loss"] for r in metrics(straight)]
    assert [r["step"] for r in metrics(out)] == [3, 4]
    np.testing.assert_allclose(resumed, uninterrupted[2:], rtol=0, atol=1e-6)
    assert len(set(uninterrupted)) == 4  # the loss moves: a trajectory that can differ


def test_non_finite_loss_on_one_rank_stops_every_rank_with_one_error(assets):
    out = assets["root"] / "nan"
    done, seconds = launch(assets, out, "--max-steps", "4", "--debug-nonfinite-step", "2",
                           "--debug-nonfinite-rank", "1", timeout=240)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: non-finite loss at step 2 on rank(s) [1] of 2; every rank stopped (try a lower "
                      "--learning-rate or --beta, and check the snapshot's weights and margins)"]
    assert "trainer.py" not in done.stderr  # no traceback from the ranks (accelerate's launcher prints its own)
    assert [r["step"] for r in metrics(out)] == [1]  # step 1 logged, step 2 never taken


def test_cpu_launch_is_detected_from_the_launcher_command_line():
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    launcher = ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "3", "-m",
                "prefcurate.training.trainer", "--num_processes", "9"]
    assert cpu_launch_num_processes(env, launcher) == 3
    assert cpu_launch_num_processes(env, ["accelerate", "launch", "--cpu", "--num-processes=2", "x.py"]) == 2
    assert cpu_launch_num_processes({**env, "RANK": "0", "WORLD_SIZE": "2"}, launcher) == 1  # torchrun: real ranks
    assert cpu_launch_num_processes({"ACCELERATE_USE_CPU": "True"}, launcher) == 1  # N = 1: no MASTER_ADDR
    assert cpu_launch_num_processes({}, launcher) == 1
    no_cpu_flag = {**env, "ACCELERATE_USE_CPU": "False"}  # `accelerate launch --num_processes 2` without --cpu
    assert cpu_launch_num_processes(no_cpu_flag, launcher, cuda=False) == 3  # no GPU: CPU ranks all the same
    assert cpu_launch_num_processes(no_cpu_flag, launcher, cuda=True) == 1  # a GPU launch is accelerate's
