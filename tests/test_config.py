"""Typed config -> flags, and start-up validation that names the flag and the value."""

from __future__ import annotations

import argparse

import pytest

from megatron_paced.config import (
    ConfigError, OptimizerConfig, ParallelConfig, add_flags, field_docs, from_args,
)
from megatron_paced.models.config import PRESETS, ModelConfig, resolve_model_config


def test_flags_round_trip_with_docstrings_as_help():
    parser = argparse.ArgumentParser()
    add_flags(parser, ParallelConfig)
    add_flags(parser, OptimizerConfig)
    args = parser.parse_args(["--tensor-model-parallel-size", "2", "--lr", "3e-4",
                              "--no-use-distributed-optimizer", "--optimizer", "sgd"])
    parallel, optim = from_args(ParallelConfig, args), from_args(OptimizerConfig, args)
    assert parallel.tensor_model_parallel_size == 2 and parallel.pipeline_model_parallel_size == 1
    assert optim.lr == 3e-4 and optim.optimizer == "sgd" and not optim.use_distributed_optimizer
    assert "split every layer" in field_docs(ParallelConfig)["tensor_model_parallel_size"]
    assert "split every layer" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "lion"])  # not a choice


@pytest.mark.parametrize("world_size, tp, pp", [(3, 2, 1), (4, 3, 1), (6, 2, 2), (1, 1, 2)])
def test_world_size_not_divisible(world_size, tp, pp):
    with pytest.raises(ConfigError) as err:
        ParallelConfig(tensor_model_parallel_size=tp,
                       pipeline_model_parallel_size=pp).validate(world_size=world_size)
    message = str(err.value)
    assert f"world size {world_size}" in message
    assert f"--tensor-model-parallel-size {tp}" in message
    assert f"--pipeline-model-parallel-size {pp}" in message


def test_tp_must_divide_heads_groups_and_ffn():
    cfg = ModelConfig(num_attention_heads=6, num_query_groups=6, hidden_size=96)
    with pytest.raises(ConfigError, match=r"--tensor-model-parallel-size 4 does not divide "
                                          r"--num-attention-heads 6"):
        cfg.validate(ParallelConfig(tensor_model_parallel_size=4))
    gqa = ModelConfig(num_attention_heads=8, num_query_groups=2, hidden_size=64)
    with pytest.raises(ConfigError, match=r"--tensor-model-parallel-size 4 does not divide "
                                          r"--num-query-groups 2"):
        gqa.validate(ParallelConfig(tensor_model_parallel_size=4))
    with pytest.raises(ConfigError, match=r"--pipeline-model-parallel-size 3 does not divide "
                                          r"--num-layers 2"):
        ModelConfig().validate(ParallelConfig(pipeline_model_parallel_size=3))
    ModelConfig().validate(ParallelConfig(tensor_model_parallel_size=2,
                                          pipeline_model_parallel_size=2))


def test_unknown_architecture():
    with pytest.raises(ConfigError, match=r"--architecture 'gpt2'.*llama, qwen2, qwen3"):
        ModelConfig(architecture="gpt2").validate()
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel.*not supported"):
        ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match=r"--model 'llama-9000'"):
        resolve_model_config("llama-9000", None)


def test_optimizer_validation():
    with pytest.raises(ConfigError, match=r"--optimizer 'sgd'.*--no-use-distributed-optimizer"):
        OptimizerConfig(optimizer="sgd").validate()
    with pytest.raises(ConfigError, match=r"--lr -1"):
        OptimizerConfig(lr=-1).validate()


HF_CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
              "max_position_embeddings": 131072,
              "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192,
                               "rope_type": "llama3"}},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
              "use_sliding_window": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
              "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
              "hidden_act": "silu"},
}


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_from_hf_config(family, tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS[family]))
    cfg = ModelConfig.from_hf_config(tmp_path)
    hf = HF_CONFIGS[family]
    assert cfg.architecture == family
    assert cfg.num_layers == hf["num_hidden_layers"] and cfg.vocab_size == hf["vocab_size"]
    assert cfg.num_query_groups == hf["num_key_value_heads"]
    assert cfg.rotary_base == hf["rope_theta"]
    assert cfg.untie_embeddings_and_output_weights is False
    assert cfg.spec.add_qkv_bias == (family == "qwen2")
    assert cfg.spec.qk_layernorm == (family == "qwen3")
    assert cfg.head_dim == hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    assert cfg.rope_scaling_factor == (32.0 if family == "llama" else None)
    cfg.validate(ParallelConfig(tensor_model_parallel_size=2))


def test_unsupported_hf_features_are_refused():
    bad_rope = dict(HF_CONFIGS["llama"], rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_hf_config(bad_rope)
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf_config(dict(HF_CONFIGS["qwen2"], hidden_act="gelu"))
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_hf_config("/nonexistent/dir")


def test_presets_are_valid():
    for name, cfg in PRESETS.items():
        cfg.validate()
    assert PRESETS["tiny-llama"].padded_vocab_size(1) == 512
    assert ModelConfig(vocab_size=151936).padded_vocab_size(2) == 152064


def test_rollout_flags_and_validation():
    from megatron_paced.rollout import RolloutConfig

    parser = argparse.ArgumentParser()
    add_flags(parser, RolloutConfig)
    args = parser.parse_args(["--rollout-backend", "sglang", "--sglang-url", "http://a:1",
                              "http://b:2", "--sglang-server-args", "--tp 2 --mem-fraction 0.6",
                              "--weight-sync", "disk"])
    cfg = from_args(RolloutConfig, args)
    assert cfg.sglang_url == ["http://a:1", "http://b:2"] and cfg.weight_sync == "disk"
    cfg.validate()
    RolloutConfig(rollout_backend="sglang", weight_sync="nccl").validate()
    with pytest.raises(ConfigError, match="--weight-sync-master-port 70000"):
        RolloutConfig(rollout_backend="sglang", weight_sync="nccl",
                      weight_sync_master_port=70000).validate()
    with pytest.raises(ConfigError, match="--rollout-concurrency 0"):
        RolloutConfig(rollout_concurrency=0).validate()


def test_gpu_runs_send_host_tensors_over_gloo():
    """The log-Z table, selection, replay and metrics reduce CPU tensors; NCCL has no CPU
    path, so a CUDA run's groups carry both backends (checked for real by the gpu tests)."""
    from megatron_paced.parallel import _backend

    assert _backend(ParallelConfig(), cuda=True) == "cpu:gloo,cuda:nccl"
    assert _backend(ParallelConfig(distributed_backend="nccl"), cuda=True) == \
        "cpu:gloo,cuda:nccl"
    assert _backend(ParallelConfig(distributed_backend="gloo"), cuda=True) == "gloo"
    assert _backend(ParallelConfig(), cuda=False) == "gloo"


@pytest.mark.parametrize("argv", [[], ["--model", "qwen2.5-7b"], ["--algo", "grpo"]])
def test_help_shows_the_defaults_the_run_uses(argv, capsys):
    """For every flag, the default `paced-train ... --help` prints is the value a run with
    the same other flags and no such flag parses to (a real model keeps the paper's lr,
    weight decay and replay; the tiny built-in one has its own)."""
    import dataclasses

    from megatron_paced.job import build_parser, parse_args

    job = parse_args(argv + ["--allow-random-init"])
    parsed = {f.name: getattr(section, f.name) for section in vars(job).values()
              if dataclasses.is_dataclass(section) for f in dataclasses.fields(section)}
    parser = build_parser(argv + ["--help"])
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--help"])
    printed = "".join(capsys.readouterr().out.split())  # wrapping may break at hyphens
    formatter = parser._get_formatter()
    checked = 0
    for action in parser._actions:
        given = any(option in argv for option in action.option_strings)
        if action.dest not in parsed or action.dest == "allow_random_init" or given:
            continue
        shown = " ".join(formatter._expand_help(action).split())  # what --help prints
        assert "".join(shown.split()) in printed, action.dest
        if action.dest == "prompt_selection":
            expected = "paced-greedy" if job.algorithm.algo == "paced" else "uniform"
            assert parsed["prompt_selection"] == expected and expected in shown
            continue
        if action.dest == "replay_per_step" and argv[:1] == ["--model"]:  # a real model's
            assert parsed["replay_per_step"] == 16 and "16 with --algo paced" in shown
            continue
        assert shown.endswith(f"(default: {parsed[action.dest]})"), (action.dest, shown)
        checked += 1
    assert checked > 100
    if argv[:1] == ["--model"]:
        assert (job.optimizer.lr, job.optimizer.weight_decay) == (1e-6, 0.1)
