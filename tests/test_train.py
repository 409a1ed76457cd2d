"""paced-train end to end on gloo processes: a run stopped by a NaN and by a kill resumes to the
uninterrupted run, resume on another DP size, a TP2 run, and start-up errors."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.conftest import chat_tokenizer
from tests.helpers.train_runs import (
    COMMON, free_port, read_metrics, rollout_server_flags, run_train,
)

# The calibration probe and the KL measurement every 2 steps: their figures must resume too.
PROBES = ["--log-z-param", "hybrid", "--calibration-interval", "2", "--calibration-prompts", "4",
          "--calibration-samples", "4", "--kl-interval", "2"]


@pytest.mark.distributed
def test_nan_stop_and_kill_resume_to_the_uninterrupted_run_and_on_another_layout(tmp_path):
    """One interrupted run, stopped twice: a NaN loss at step 3 stops it with a message (the
    step-2 checkpoint intact); resumed, it is killed after step 3 (before its next save);
    resumed again, its metrics equal an uninterrupted run's. The uninterrupted DP2 checkpoint
    then resumes on DP1. log Z is the hybrid (head, residual table, features: all in the
    checkpoint)."""
    full, run, moved = tmp_path / "full", tmp_path / "run", tmp_path / "moved"
    run_train(COMMON + PROBES + ["--train-iters", "4", "--save", str(full)])
    uninterrupted = read_metrics(full / "metrics.jsonl")
    assert uninterrupted[4]["num_samples"] == 64 and uninterrupted[4]["num_replayed"] == 4
    # Probe samples are not training samples; the probe and the KL come every 2 steps.
    assert "calib_visited_rmse_corrected" in uninterrupted[2] and "beta_kl_old_new" in \
        uninterrupted[4] and "beta_kl_old_new" not in uninterrupted[3]
    assert uninterrupted[2]["calib_visited_num"] == 4 == uninterrupted[2]["calib_unvisited_num"]
    assert uninterrupted[2]["calib_heldout_num"] == 4  # the head on prompts held out
    assert abs(uninterrupted[4]["beta_kl_old_new"]) < 0.05  # held-out samples: either sign

    result = run_train(COMMON + PROBES + ["--train-iters", "4", "--save", str(run),
                                          "--inject-nan-at-step", "3"], expect=3)
    assert "paced-train: error: step 3: non-finite PACED loss residual" in result.output, \
        result.output[-3000:]
    assert "prompt ids [" in result.output and "the last checkpoint is intact" in result.output
    assert 'megatron_paced/train.py", line' not in result.output  # a message, not a traceback
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not (run / "iter_0000003").exists() and not list(run.glob("*.tmp"))
    assert sorted(read_metrics(run / "metrics.jsonl")) == [1, 2]

    run_train(COMMON + PROBES + ["--train-iters", "4", "--save", str(run), "--load", str(run),
                                 "--exit-after-step", "3"], expect=17)
    assert (run / "iter_0000002").is_dir() and not (run / "iter_0000004").exists()
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "2"

    run_train(COMMON + PROBES + ["--train-iters", "4", "--save", str(run), "--load", str(run)])
    resumed = read_metrics(run / "metrics.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == uninterrupted
    # Resume DP2's checkpoint on DP1 (one process) and go on.
    run_train(COMMON + PROBES + ["--train-iters", "6", "--save", str(moved), "--load",
                                 str(full)], nprocs=1)
    after = read_metrics(moved / "metrics.jsonl")
    assert sorted(after) == [5, 6] and after[6]["num_samples"] == 96
    assert all(0 <= after[s]["acc_est_mae"] <= 1 for s in after)


@pytest.mark.distributed
def test_diverged_update_stops_at_the_next_rollout(tmp_path):
    """lr 1e30 gives finite weights of 1e30, which overflow the next rollout's logits: the run
    stops naming the step, and the last checkpoint is the step before."""
    diverged = tmp_path / "diverged"
    result = run_train(COMMON + ["--train-iters", "4", "--save", str(diverged),
                                 "--save-interval", "1", "--lr", "1e30", "--sft-warmup-iters",
                                 "0", "--allow-random-init"], nprocs=1, expect=3)
    assert "paced-train: error: step 2: non-finite logits while sampling" in result.output, \
        result.output[-3000:]
    assert (diverged / "latest_checkpointed_iteration.txt").read_text() == "1"


@pytest.mark.distributed
def test_tp2_run_with_launched_rollout_servers_and_group_weight_sync(tmp_path):
    """--rollout-backend sglang against the project's server (SGLang's API): two servers for
    the node, asked once per replica; --weight-sync nccl (gloo here) pushes the policy before
    the first step, so the server's log-probs are the trainer's (kl_old_theta ~ 0 with
    --old-log-probs engine); asynchronous (--max-staleness 1): the pushes go over the group
    from the trainer's rollout thread, in order."""
    save = tmp_path / "sglang"
    run_train(COMMON + ["--train-iters", "2", "--save", str(save), "--tensor-model-parallel-size",
                        "2", *rollout_server_flags(), "--weight-sync", "nccl",
                        "--old-log-probs", "engine", "--max-staleness", "1",
                        "--sglang-num-servers", "2"])
    rows = read_metrics(save / "metrics.jsonl")
    assert sorted(rows) == [1, 2] and rows[2]["num_samples"] == 32
    assert abs(rows[1]["kl_old_theta"]) < 1e-4, rows[1]
    assert [rows[1]["staleness_max"], rows[2]["staleness_max"]] == [0.0, 1.0]
    assert sorted(p.name for p in save.glob("sglang-*.log")) == ["sglang-0.log",
                                                                 "sglang-1.log"]


@pytest.mark.distributed
def test_two_nodes_pp2_disk_sync_reaches_every_nodes_server(tmp_path):
    """Two torchrun agents on loopback (two "nodes", one process each: PP2 with a stage per
    node), each launching its own server, --weight-sync disk into one --weight-sync-dir: both
    stages' senders write into the one staging folder, rank 0 pushes it to both nodes'
    servers, each must report the version (else the run stops with the server's URL),
    generation uses both, and the closed trainer leaves no staging behind."""
    import os
    import subprocess
    import sys

    save, staging = tmp_path / "two-nodes", tmp_path / "staging"
    staging.mkdir()
    master, base = free_port(), free_port()
    args = COMMON + ["--train-iters", "2", "--save", str(save), "--pipeline-model-parallel-size",
                     "2", *rollout_server_flags(port=base), "--weight-sync", "disk",
                     "--weight-sync-dir", str(staging), "--rollout-prompts-per-request", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
         str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
         str(master), "-m", "megatron_paced.train", *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in range(2)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-4000:] + outputs[1][-3000:]
    rows = read_metrics(save / "metrics.jsonl")
    assert sorted(rows) == [1, 2] and rows[2]["num_samples"] == 32
    logs = sorted(save.glob("sglang-*.log"))
    assert [p.name for p in logs] == ["sglang-0.log", "sglang-1.log"]  # one per node
    for log in logs:  # both nodes' servers were pushed every version and generated
        text = log.read_text()
        assert text.count("POST /update_weights_from_disk 200") == 3, text[-2000:]  # 0, 1, 2
        assert "POST /generate 200" in text, text[-2000:]
    # The trainer closed: the run's staging folder (every version in it) is gone.
    assert list(staging.iterdir()) == [], list(staging.rglob("*"))


@pytest.mark.distributed
def test_grpo_with_dynamic_sampling_counts_every_completion(tmp_path):
    """DAPO-style dynamic sampling on DP2: rounds of fresh prompts until each rank has groups
    whose rewards differ; num_samples counts all completions generated, so it grows faster
    than prompts x samples per step. Each step's groups train as two mini-batches, one
    optimizer step each (--num-steps-per-rollout 2)."""
    save = tmp_path / "dapo"
    flags = list(COMMON)
    flags[flags.index("--replay-per-step") + 1] = "0"
    flags[flags.index("--micro-batch-size") + 1] = "4"
    run_train(flags + ["--train-iters", "3", "--save", str(save),
                       "--algo", "grpo", "--prompt-selection", "uniform", "--dynamic-sampling",
                       "--dynamic-sampling-max-rounds", "3", "--save-interval", "0",
                       "--num-steps-per-rollout", "2"])
    rows = read_metrics(save / "metrics.jsonl")
    samples = [rows[s]["num_samples"] for s in (1, 2, 3)]
    per_step = [b - a for a, b in zip([0] + samples, samples)]
    assert all(n % 16 == 0 and 16 <= n <= 48 for n in per_step), per_step
    assert max(per_step) > 16, per_step  # some step needed another round


@pytest.mark.distributed
def test_flowrl_proj_z_trains_resumes_exactly_and_stays_out_of_exports(tmp_path):
    """FlowRL as its recipe runs it (log Z from the ProjZ head on the policy's prompt states,
    uniform prompts): its head is in the checkpoint, a run resumed from step 2 equals the
    uninterrupted one (the head's weights and Adam state resume), and the Hugging Face export
    leaves the head out."""
    import shutil

    from megatron.core import dist_checkpointing

    from megatron_paced.convert import convert_megatron_to_hf

    full, run = tmp_path / "full", tmp_path / "run"
    flowrl = COMMON + ["--algo", "flowrl", "--train-iters", "4"]
    run_train(flowrl + ["--save", str(full)])
    uninterrupted = read_metrics(full / "metrics.jsonl")
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    saved = dist_checkpointing.load_tensors_metadata(str(full / "iter_0000004"))
    head = sorted(key for key in saved if key.startswith("proj_z."))
    assert len(head) == 10  # 3 linear layers and 2 LayerNorms (its Adam state: see resume)
    shutil.copytree(full, run)
    shutil.rmtree(run / "iter_0000004")
    (run / "latest_checkpointed_iteration.txt").write_text("2")
    run_train(flowrl + ["--save", str(run), "--load", str(run)])
    assert read_metrics(run / "metrics.jsonl") == uninterrupted
    convert_megatron_to_hf(str(full), str(tmp_path / "hf"), progress=False)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["num_hidden_layers"] >= 1
    from safetensors import safe_open

    names = [name for path in (tmp_path / "hf").glob("*.safetensors")
             for name in safe_open(str(path), "pt").keys()]
    assert names and not [name for name in names if "proj_z" in name]


def _prompt_file(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


SUMS = [{"prompt": f"what is {a} + {b} ?", "answer": str(a + b)}
        for a in range(10) for b in range(10 - a)]
PROMPT_TASK = ["--task", "prompts", "--reward", "exact", "--vocab-size", "32",
               "--num-prompts-per-step", "4", "--num-samples-per-prompt", "4",
               "--micro-batch-size", "8", "--max-new-tokens", "4"]


@pytest.mark.distributed
def test_tp2_bf16_run_on_a_prompt_file_with_an_hf_tokenizer_trains_and_logs(tmp_path):
    """--task prompts (a JSONL file, an HF tokenizer with a chat template, exact-match reward)
    on TP2 in bf16 with --deterministic-mode and evaluation."""
    tokenizer, _ = chat_tokenizer(tmp_path / "tokenizer")
    data = _prompt_file(tmp_path / "sums.jsonl", SUMS)
    save = tmp_path / "run"
    run_train(PROMPT_TASK + ["--allow-random-init", "--tokenizer", tokenizer, "--prompt-data",
                             data, "--train-iters", "2", "--save", str(save),
                             "--tensor-model-parallel-size", "2", "--eval-interval", "2",
                             "--eval-num-prompts", "4", "--bf16", "--deterministic-mode",
                             "--grad-noise-scale-interval", "2", *PROBES])
    rows = read_metrics(save / "metrics.jsonl")
    assert sorted(rows) == [0, 1, 2] and rows[2]["num_samples"] == 32
    # metrics.jsonl's keys are an interface (plots, the benchmark, users' dashboards).
    step_keys = {"step", "num_samples", "reward_mean", "acc_est_mae", "selected_acc_est_mean",
                 "informative_groups",
                 "loss", "grad_norm", "kl_old_theta", "num_replayed",
                 "old_logprob_drift_abs", "old_logprob_drift_kl"}  # + TIMINGS, dropped
    eval_keys = {"eval_pass@1", "eval_pass@2", "eval_pass@4"}
    probe_keys = {f"calib_{group}_{name}" for group in ("visited", "unvisited", "heldout")
                  for name in ("mae", "noise_var", "rmse_corrected", "acc_std", "num")}
    assert set(rows[0]) == {"step", "num_samples"} | eval_keys
    assert set(rows[1]) == step_keys
    # DP1: the noise scale's small batch is the first (shuffled) micro-batch of 8 of 16 rows.
    noise_keys = {"grad_noise_scale", "grad_noise_scale_se", "grad_sq_norm", "grad_noise_trace",
                  "grad_noise_steps", "grad_batch_items"}
    assert set(rows[2]) == step_keys | eval_keys | probe_keys | noise_keys | {"beta_kl_old_new"}
    assert rows[2]["grad_noise_steps"] == 2 and rows[2]["grad_batch_items"] > 0
    assert all(math.isfinite(rows[2][key]) for key in noise_keys)  # G^2's estimate may be < 0
    assert "eval_pass@4" in rows[2] and 0 <= rows[2]["eval_pass@1"] <= 1
    assert "eval_pass@1" in rows[0]
    for key in ("reward_mean", "acc_est_mae", "selected_acc_est_mean", "loss", "grad_norm"):
        assert key in rows[2] and rows[2][key] == rows[2][key]  # present and not NaN
    assert json.loads((save / "iter_0000002" / "contents.json").read_text())[
        "params_dtype"] == "bfloat16"
    # The run's folder holds its resolved configuration, and it repeats the run bit for bit.
    again = tmp_path / "again"
    run_train(["--config", str(save / "config.yaml"), "--save", str(again)])
    assert read_metrics(again / "metrics.jsonl") == rows
    checksums = [json.loads((run / "iter_0000002" / "checksums.json").read_text())
                 for run in (save, again)]  # every file's sha256 but torch's .metadata (ids)
    assert len(checksums[0]) > 3 and checksums[0].pop(".metadata") and checksums[1].pop(
        ".metadata") and checksums[0] == checksums[1]


# Start-up errors: every case runs through paced-train's main() in ONE child process
# (megatron_paced.testing.cli), not a Python start per case.
BAD_FLAGS = {
    "global_batch": (["--global-batch-size", "30"], {"WORLD_SIZE": "2"},
                     "--global-batch-size 30 contradicts --num-prompts-per-step 16"),
    "micro_batch": (["--micro-batch-size", "5"], {},
                    "--micro-batch-size 5: must divide the 128 sequences"),
    "missing_load": (["--load", "/nonexistent/run"], {},
                     "--load '/nonexistent/run': no such folder"),
    "vocab": (["--vocab-size", "10"], {},
              "the arithmetic task's tokenizer has 17 tokens but --vocab-size is 10"),
    "world_tp": (["--tensor-model-parallel-size", "3"], {},
                 "world size 1 is not divisible by --tensor-model-parallel-size 3"),
    "tp_heads": (["--tensor-model-parallel-size", "2", "--num-attention-heads", "5",
                  "--num-query-groups", "5", "--hidden-size", "80"], {"WORLD_SIZE": "2"},
                 "--tensor-model-parallel-size 2 does not divide --num-attention-heads 5"),
    "architecture": (["--architecture", "gpt2"], {}, "--architecture 'gpt2': unknown architecture"),
    "beta": (["--beta", "0"], {}, "--beta 0"),
    "tau": (["--target-acc", "1.0"], {}, "--target-acc 1.0: tau must be in (0, 1)"),
    "no_steps": (["--train-iters", "0"], {}, "--train-iters 0: runs no RL step: it needs "
                 "--sft-warmup-iters > 0 and --save"),
    "too_many_prompts": (["--config", "/dev/null", "--num-prompts-per-step", "1000"], {},
                         "--num-prompts-per-step 1000: must be <= the 512 training prompts of "
                         "--task arithmetic"),
    "dynamic_sampling": (["--dynamic-sampling"], {}, "needs --prompt-selection uniform"),
    "grpo_paced_selection": (["--algo", "grpo", "--prompt-selection", "paced-greedy"], {},
                             "--prompt-selection paced-greedy with --algo grpo: GRPO trains no "
                             "log-Z table"),
    "gsm8k_tokenizer": (["--task", "gsm8k"], {}, "--task gsm8k needs --tokenizer DIR"),
    "paced_temperature": (["--temperature", "0.7", "--sft-warmup-iters", "1"], {},
                          "--temperature 0.7: (--top-p 1.0) with --algo paced: the loss anchors "
                          "on pi_old's temperature-1 log-probs"),
    # Bare paced-train: a random policy earns no reward; the message names what to pass.
    "bare": ([], {}, "the policy would start from random weights (no --load, --sft-warmup-iters "
             "0), and RL from random weights learns nothing: start from a checkpoint (--load "
             "DIR"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every start-up error case of this module, run in one child: name -> CliResult. The
    cases that need files (checkpoints, YAML, tokenizer, prompt files) are made here."""
    from megatron_paced.testing.cli import CliCase, run_cli_cases

    root = tmp_path_factory.mktemp("cli")
    cases = {name: (flags, env) for name, (flags, env, _) in BAD_FLAGS.items()}
    ckpt = root / "ckpt"
    (ckpt / "iter_0000003").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    (ckpt / "iter_0000003" / "model_config.json").write_text(json.dumps(
        {"architecture": "llama", "num_layers": 2, "hidden_size": 64}))
    cases["load_shape"] = (["--load", str(ckpt)], {})
    empty, hf = root / "empty", root / "hf"
    empty.mkdir()
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hf / name).write_text("{}")
    cases["load_empty"] = (["--load", str(empty)], {})
    cases["load_hf"] = (["--load", str(hf)], {})
    cases["load_is_save"] = (["--load", str(empty), "--save", str(empty)], {})  # a requeue
    config, bad = root / "run.yaml", root / "bad.yaml"
    config.write_text("num-prompts-per-step: 3\nmicro_batch_size: 7\n")
    bad.write_text("num_promts_per_step: 3\n")
    cases["yaml"] = (["--config", str(config)], {})
    cases["yaml_overridden"] = (["--config", str(config), "--micro-batch-size", "5"], {})
    cases["yaml_unknown"] = (["--config", str(bad)], {})
    tokenizer, _ = chat_tokenizer(root / "tokenizer")
    data = _prompt_file(root / "sums.jsonl", SUMS)
    no_answer = _prompt_file(root / "no_answer.jsonl", SUMS[:2] + [{"prompt": "what is 1 ?"}])
    dataset = {"data_vocab": ["--prompt-data", data, "--vocab-size", "10"],
               "data_positions": ["--prompt-data", data, "--max-position-embeddings", "16"],
               "data_prompt_length": ["--prompt-data", data, "--max-prompt-length", "10"],
               "data_no_answer": ["--prompt-data", no_answer],
               "data_sft": ["--prompt-data", data, "--sft-warmup-iters", "5"]}
    for name, flags in dataset.items():
        cases[name] = (PROMPT_TASK + ["--tokenizer", tokenizer] + flags, {})
    results = run_cli_cases([CliCase("megatron_paced.train", flags, env)
                             for flags, env in cases.values()])
    return dict(zip(cases, results)) | {"paths": {"tokenizer": tokenizer, "data": data,
                                                  "no_answer": no_answer}}


def _refused(result, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_flags_fail_before_work(cli, name):
    _refused(cli[name], BAD_FLAGS[name][2])


def test_dataset_that_does_not_match_model_or_tokenizer(cli):
    paths = cli["paths"]
    expected = {
        "data_vocab": f"--tokenizer {paths['tokenizer']} has 25 tokens but --vocab-size is 10",
        "data_positions": "the longest prompt (19 tokens) + --max-new-tokens 4 = 23 exceeds "
                          "--max-position-embeddings 16",
        "data_prompt_length": f"{paths['data']}:1: prompt of 19 tokens exceeds "
                              "--max-prompt-length 10",
        "data_no_answer": f"{paths['no_answer']}:3: row has no 'answer'",
        "data_sft": "--sft-warmup-iters: the supervised warm start is only built in for "
                    "--task arithmetic",
    }
    for name, message in expected.items():
        _refused(cli[name], message)


def test_load_of_another_model_shape(cli):
    _refused(cli["load_shape"], "holds another model shape (num_layers: checkpoint 2 vs this "
                                "run 4")


def test_load_without_a_checkpoint_is_one_line_naming_what_to_pass(cli):
    """--load of an empty folder or of an HF model folder: exit 2, one line, before any
    model is built; an empty --load that is also --save starts fresh (Megatron's requeue
    pattern), so there the random-start refusal speaks."""
    root = os.path.dirname(cli["paths"]["data"])
    expected = {"load_empty": f"--load '{root}/empty' holds no checkpoint (no "
                              "latest_checkpointed_iteration.txt; it is empty): pass a folder",
                "load_hf": f"--load '{root}/hf' is a Hugging Face model folder, not a Megatron "
                           f"checkpoint: convert it first (python tools/convert_hf_to_megatron.py "
                           f"--hf-dir {root}/hf --save CKPT) and pass --load CKPT",
                "load_is_save": "the policy would start from random weights"}
    for name, message in expected.items():
        _refused(cli[name], message)
        lines = [line for line in cli[name].stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "building" not in cli[name].stdout.lower(), cli[name].stderr


def test_yaml_config_sets_flags_and_rejects_unknown_keys(cli):
    # Both YAML values reach validation (3 prompts x 8 samples = 24 sequences) ...
    _refused(cli["yaml"], "--micro-batch-size 7: must divide the 24 sequences")
    # ... and a flag on the command line overrides the file.
    _refused(cli["yaml_overridden"], "--micro-batch-size 5: must divide the 24 sequences")
    _refused(cli["yaml_unknown"], "unknown keys ['num_promts_per_step']")


def test_resume_in_another_precision_is_refused_but_weights_load(tmp_path):
    import dataclasses

    import torch

    from megatron_paced.checkpointing import check_loadable
    from megatron_paced.config import ConfigError
    from megatron_paced.job import TINY_MODEL

    iteration = tmp_path / "iter_0000005"
    iteration.mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    (iteration / "model_config.json").write_text(json.dumps(dataclasses.asdict(TINY_MODEL)))
    contents = iteration / "contents.json"
    contents.write_text(json.dumps({"contents": ["model", "optimizer", "paced", "counters"],
                                    "params_dtype": "bfloat16"}))
    assert check_loadable(str(tmp_path), TINY_MODEL, torch.bfloat16) == 5
    with pytest.raises(ConfigError, match=r"trained in bfloat16 and this run is float32 "
                                          r"\(--no-bf16\)"):
        check_loadable(str(tmp_path), TINY_MODEL, torch.float32)
    contents.write_text(json.dumps({"contents": ["model"], "params_dtype": "bfloat16"}))
    assert check_loadable(str(tmp_path), TINY_MODEL, torch.float32) == 5  # weights: any dtype
    contents.unlink()  # a checkpoint without a recorded precision: read as fp32
    with pytest.raises(ConfigError, match="trained in float32 and this run is bfloat16"):
        check_loadable(str(tmp_path), TINY_MODEL, torch.bfloat16)
