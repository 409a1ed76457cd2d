"""The launch scripts of ``examples/``.

* Every script's trainer flags are real and consistent: each script runs with stand-ins for
  ``paced-run`` (their torchrun), ``srun``, ``scontrol`` and ``curl`` on ``PATH``, and the flags it would launch
  are parsed by paced-train's own parser and checked against the world size it would start
  (TP x PP divides it, the batch divides over DP, the model's heads and layers over TP and PP).
* A real Slurm job (slow): ``tools/slurm_loopback.sh`` brings up a one-node cluster on 127.0.0.1,
  then ``examples/tiny_cpu.sh`` goes through ``sbatch --wait`` as two Slurm tasks, and trains.

The two tasks are two torchrun agents on the one node, each with one process
(``torchrun --nnodes 2 --nproc-per-node 1 --node-rank $SLURM_PROCID``): the arrangement of the
multi-node sbatch examples (one torchrun per node, rank 0 on the first node hosting the
rendezvous) on one machine, giving DP2 over gloo. Skipped, with the script's reason, where
Slurm cannot be installed or started (no root, no apt-get, no mirror)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_paced.utils import free_port

REPO = Path(__file__).resolve().parents[1]
# Two RL steps of the demo's tiny model: 4 prompts x 4 samples + 4 replayed = 20 sequences,
# 10 per DP rank, micro-batches of 5; no SFT warm start, no evaluation, one checkpoint at the end.
FLAGS = ["--train-iters", "2", "--num-prompts-per-step", "4", "--num-samples-per-prompt", "4",
         "--micro-batch-size", "5", "--task-num-prompts", "64", "--task-max-digits", "2",
         "--sft-warmup-iters", "0", "--allow-random-init", "--replay-size", "16",
         "--replay-per-step", "4",
         "--no-replay-successful-only", "--max-new-tokens", "6", "--eval-interval", "0",
         "--save-interval", "0"]
JOB_TIMEOUT_S = 240

# Stand-ins that record what the scripts would run. srun runs its command with
# SLURM_PROCID=0 (the first task), except an SGLang server, which it only records.
SHIMS = {
    "paced-run": 'printf "%s\\n" "$@" >"$SHIM_LOG/paced-run"\n',
    "srun": ('printf "%s\\n" "$*" >>"$SHIM_LOG/srun"\n'
             'while [[ $# -gt 0 && $1 == --* ]]; do shift; done\n'
             '[[ $1 == python ]] && exit 0\n'
             'SLURM_PROCID=0 exec "$@"\n'),
    "scontrol": 'printf "%s\\n" $SHIM_NODES\n',
    # The health check answers once the server's srun has started (it runs in the background:
    # on a loaded machine the script could otherwise finish before it logged its line).
    "curl": ('for _ in $(seq 300); do\n'
             '    grep -qs sglang.launch_server "$SHIM_LOG/srun" && exit 0; sleep 0.1\n'
             'done\nexit 0\n'),
}
# Shapes of the Hugging Face configs of the sbatch targets (--hf-config).
HF_CONFIGS = {
    "qwen2.5_32b.sbatch": dict(
        architectures=["Qwen2ForCausalLM"], num_hidden_layers=64, hidden_size=5120,
        intermediate_size=27648, num_attention_heads=40, num_key_value_heads=8,
        vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, hidden_act="silu"),
    "llama3_70b.sbatch": dict(
        architectures=["LlamaForCausalLM"], num_hidden_layers=80, hidden_size=8192,
        intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=8192, rope_theta=5e5, rms_norm_eps=1e-5,
        tie_word_embeddings=False, hidden_act="silu"),
}
# script, environment, nodes of the Slurm job, expected (world size, TP, PP, SGLang URLs)
LAUNCHES = [
    ("qwen2.5_1.5b_math.sh", {}, [], (8, 1, 1, [])),
    ("qwen2.5_7b_math.sh", {"TASK": "math500", "ROLLOUT": "sglang",
                            "SGLANG_URL": "http://a:30000 http://b:30000"}, [],
     (8, 2, 1, ["http://a:30000", "http://b:30000"])),
    ("qwen2.5_32b.sbatch", {}, ["n0", "n1", "n2"], (16, 8, 2, ["http://n2:30000"])),
    ("llama3_70b.sbatch", {}, [f"n{i}" for i in range(5)], (32, 8, 4, ["http://n4:30000"])),
    ("llama3_70b.sbatch", {"SGLANG_NODES": "2"}, [f"n{i}" for i in range(6)],
     (32, 8, 4, ["http://n4:30000", "http://n5:30000"])),
]


def _run_script(tmp_path, script: str, env: dict, nodes: list[str]):
    bin_dir, log_dir, hf_dir = tmp_path / "bin", tmp_path / "log", tmp_path / "hf"
    for folder in (bin_dir, log_dir, hf_dir):
        folder.mkdir(exist_ok=True)
    for name, body in SHIMS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    if script in HF_CONFIGS:
        (hf_dir / "config.json").write_text(json.dumps(HF_CONFIGS[script]))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(PATH=f"{bin_dir}{os.pathsep}{full_env.get('PATH', '')}",
                    SHIM_LOG=str(log_dir), SHIM_NODES=" ".join(nodes), HF_DIR=str(hf_dir),
                    SAVE=str(tmp_path / "save"), **env)
    if nodes:
        full_env.update(SLURM_JOB_ID="1", SLURM_JOB_NODELIST=",".join(nodes))
    result = subprocess.run(["bash", str(REPO / "examples" / script)], env=full_env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    return result, log_dir


@pytest.mark.parametrize("script,env,nodes,expected", LAUNCHES,
                         ids=[f"{s}-{'-'.join(e) or 'default'}" for s, e, _, _ in LAUNCHES])
def test_example_launches_real_flags_that_fit_their_layout(tmp_path, script, env, nodes,
                                                          expected):
    from megatron_paced.job import parse_args
    from megatron_paced.validation import validate_batch

    world_size, tp, pp, urls = expected
    result, log_dir = _run_script(tmp_path, script, env, nodes)
    assert result.returncode == 0, result.stderr
    argv = (log_dir / "paced-run").read_text().splitlines()
    split = argv.index("-m")
    assert argv[split + 1] == "megatron_paced.train"
    launcher = dict(zip(argv[:split:2], argv[1:split:2]))
    assert int(launcher["--nnodes"]) * int(launcher["--nproc-per-node"]) == world_size
    assert launcher["--node-rank"] == "0"
    if nodes:  # the head node hosts the rendezvous; the SGLang nodes train nothing
        assert launcher["--master-addr"] == nodes[0]
        assert int(launcher["--nnodes"]) == len(nodes) - len(urls)
    job = parse_args(argv[split + 2:])
    parallel, train = job.parallel, job.train
    assert (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size) == (tp, pp)
    parallel.validate(world_size=world_size)
    job.model.validate(parallel)
    job.rollout.validate()
    validate_batch(job, parallel.data_parallel_size(world_size))
    # The paper's settings.
    assert (job.algorithm.algo, job.algorithm.beta, job.batch.num_samples_per_prompt) == \
        ("paced", 0.05, 8)
    assert (job.optimizer.lr, job.sampling.max_new_tokens) == (1e-6, 3072)
    assert job.data.max_prompt_length == 1024
    # What the planner sized the example layouts with (README, docs/planner.md).
    assert train.bf16 and parallel.recompute_granularity == "selective"
    assert job.task.task == env.get("TASK", "gsm8k")
    assert job.task.tokenizer == str(tmp_path / "hf")
    assert job.rollout.rollout_backend == ("sglang" if urls else "embedded")
    assert job.rollout.sglang_url == urls
    if script.endswith(".sbatch"):
        sruns = (log_dir / "srun").read_text().splitlines()
        sglang = [line for line in sruns if "sglang.launch_server" in line]
        assert len(sglang) == 1 and "--overlap" in sglang[0] and "--tp 8" in sglang[0]
        assert f"--nodelist={','.join(nodes[-len(urls):])}" in sglang[0]
        # Servers on the cluster network have a key; the weights are staged where they
        # can read them.
        assert "--host 0.0.0.0" in sglang[0] and "--api-key " in sglang[0], sglang[0]
        assert "SGLANG_RETURN_ORIGINAL_LOGPROB=1" in sglang[0], sglang[0]
        assert job.rollout.weight_sync_dir and job.rollout.weight_sync_dir.endswith(
            "weight-staging")


@pytest.mark.parametrize("script,env,nodes,message", [
    ("qwen2.5_7b_math.sh", {"ROLLOUT": "sglang"}, [], "ROLLOUT=sglang needs SGLANG_URL"),
    ("qwen2.5_1.5b_math.sh", {"ROLLOUT": "vllm"}, [], "choose embedded or sglang"),
    ("qwen2.5_32b.sbatch", {"SGLANG_NODES": "0"}, ["n0", "n1"], "needs PP=1"),
    ("llama3_70b.sbatch", {}, ["n0", "n1", "n2"], "need a multiple of TP 8 x PP 4 GPUs"),
])
def test_example_refuses_a_layout_it_cannot_run(tmp_path, script, env, nodes, message):
    result, log_dir = _run_script(tmp_path, script, env, nodes)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (log_dir / "paced-run").exists()


def _start_cluster() -> None:
    try:
        result = subprocess.run(["bash", str(REPO / "tools" / "slurm_loopback.sh")],
                                capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("tools/slurm_loopback.sh did not finish in 600 s")
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no message"]
        pytest.skip(f"no Slurm cluster here: {lines[-1]}")


@pytest.mark.slow
def test_sbatch_two_tasks_train_tiny_cpu(tmp_path):
    _start_cluster()
    save, log = tmp_path / "run", tmp_path / "slurm.out"
    name = f"paced-test-slurm-{os.getpid()}"
    # The job inherits this environment (sbatch --export=ALL): the repo's venv first on PATH so
    # that `paced-run` is its paced-run; no SLURM_* of an enclosing job.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               SAVE=str(save), NPROC="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
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
    assert all(r["loss"] == r["loss"] for r in rows)
    # The replay draws before it offers: step 1 finds it empty, step 2 draws 4.
    assert [r["num_replayed"] for r in rows] == [0, 4]
    assert (save / "iter_0000002").is_dir()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert "paced run: steps 1-2" in output, output[-3000:]


def _tail(path: Path, num_chars: int = 4000) -> str:
    return path.read_text()[-num_chars:] if path.exists() else f"(no {path.name})"

