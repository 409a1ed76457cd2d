"""A real Slurm job: ``tools/slurm_loopback.sh`` brings up a one-node cluster on 127.0.0.1, then
``examples/tiny_cpu.sh`` goes through ``sbatch --wait`` as two Slurm tasks, and trains.

The two tasks are two torchrun agents on the one node, each with one process
(``torchrun --nnodes 2 --nproc-per-node 1 --node-rank $SLURM_PROCID``): the arrangement of the
multi-node sbatch examples (one torchrun per node, rank 0 on the first node hosting the
rendezvous) on one machine, giving DP2 over gloo. Skipped, with the script's reason, where
Slurm cannot be installed or started (no root, no apt-get, no mirror)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Two RL steps of the demo's tiny model: 4 prompts x 4 samples + 4 replayed = 20 sequences,
# 10 per DP rank, micro-batches of 5; no SFT warm start, no evaluation, one checkpoint at the end.
FLAGS = ["--train-iters", "2", "--num-prompts-per-step", "4", "--num-samples-per-prompt", "4",
         "--micro-batch-size", "5", "--task-num-prompts", "64", "--task-max-digits", "2",
         "--sft-warmup-iters", "0", "--replay-size", "16", "--replay-per-step", "4",
         "--no-replay-successful-only", "--max-new-tokens", "6", "--eval-interval", "0",
         "--save-interval", "0"]
JOB_TIMEOUT_S = 240


def _start_cluster() -> None:
    try:
        result = subprocess.run(["bash", str(REPO / "tools" / "slurm_loopback.sh")],
                                capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("tools/slurm_loopback.sh did not finish in 600 s")
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no message"]
        pytest.skip(f"no Slurm cluster here: {lines[-1]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sbatch_two_tasks_train_tiny_cpu(tmp_path):
    _start_cluster()
    save, log = tmp_path / "run", tmp_path / "slurm.out"
    name = f"paced-test-slurm-{os.getpid()}"
    # The job inherits this environment (sbatch --export=ALL): the repo's venv first on PATH so
    # that `torchrun` is its torchrun; no SLURM_* of an enclosing job.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               SAVE=str(save), NPROC="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    command = ["sbatch", "--wait", f"--job-name={name}", "--nodes=1", "--ntasks=2",
               "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5", f"--chdir={REPO}",
               f"--output={log}", "examples/tiny_cpu.sh", *FLAGS]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True,
                                timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
        pytest.fail(f"sbatch --wait took over {JOB_TIMEOUT_S} s; job cancelled\n{_tail(log)}")
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{_tail(log)}"
    job_id = result.stdout.split()[-1]

    output = log.read_text()
    # Slurm gave the job two tasks; a world of two ranks (one distcp file set per rank) means
    # both torchrun agents (--nnodes 2, one process each) joined: one alone would have waited.
    job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    assert "NumTasks=2" in job, job
    ranks = {re.fullmatch(r"__(\d+)_\d+\.distcp", p.name).group(1)
             for p in (save / "iter_0000002").glob("__*.distcp")}
    assert ranks == {"0", "1"}, (ranks, output[-3000:])
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2], output[-3000:]
    # 16 fresh completions per step over both DP ranks (each agent generated 8).
    assert [r["num_samples"] for r in rows] == [16, 32]
    assert all(r["loss"] == r["loss"] and r["num_replayed"] == 4 for r in rows)
    assert (save / "iter_0000002").is_dir()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert "paced run: steps 1-2" in output, output[-3000:]


def _tail(path: Path, num_chars: int = 4000) -> str:
    return path.read_text()[-num_chars:] if path.exists() else f"(no {path.name})"

