"""Prompt selection rules on one process (the DP equivalence runs in paced_worker.py)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_paced.config import ConfigError
from megatron_paced.paced.log_z import ShardedLogZ
from megatron_paced.paced.selection import (
    PromptSelector, SelectionConfig, block_uniforms, draw_uniform_ids, select_prompts,
)


def test_greedy_picks_nearest_tau_and_tries_unvisited_first():
    acc = torch.linspace(0, 1, 101, dtype=torch.float64)  # prompt i has acc i / 100
    chosen = select_prompts(acc, 5, SelectionConfig(target_acc=0.3), seed=0, step=0)
    assert sorted(chosen.tolist()) == [28, 29, 30, 31, 32] and chosen[0] == 30
    # Estimates outside [0, 1] are clipped for selection only.
    assert select_prompts(torch.tensor([1.7, 0.9, -0.4], dtype=torch.float64), 1,
                          SelectionConfig(target_acc=0.95), seed=0, step=0).tolist() == [1]
    table = ShardedLogZ(50, beta=0.05, init_acc=0.5, lr=0.5)
    table.apply_gradients(torch.arange(25), torch.full((25,), 4.0))  # visited: acc 0.4
    picked = PromptSelector(SelectionConfig(), seed=1).select(table, 10, step=0)
    assert (picked >= 25).all()  # unvisited (acc = tau) come first ...
    again = PromptSelector(SelectionConfig(), seed=2).select(table, 10, step=0)
    assert set(picked.tolist()) != set(again.tolist())  # ... in a seed-dependent order


def test_soft_sampling_follows_weights():
    acc = torch.tensor([0.5, 0.6, 0.9, 0.0], dtype=torch.float64)
    cfg = SelectionConfig(prompt_selection="paced-soft", selection_temperature=0.1)
    counts = torch.zeros(4)
    num_steps = 4000
    for step in range(num_steps):
        counts[select_prompts(acc, 1, cfg, seed=0, step=step)] += 1
    weights = torch.exp(-(acc - 0.5).abs() / 0.1)
    expected = num_steps * weights / weights.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (counts, expected)  # 3 dof, 0.999 quantile


def test_uniform_and_epsilon():
    acc = torch.full((1000,), 0.5, dtype=torch.float64)
    acc[:10] = 0.0
    uniform = select_prompts(acc, 100, SelectionConfig(prompt_selection="uniform"), seed=0, step=3)
    assert len(set(uniform.tolist())) == 100
    ids = draw_uniform_ids(10**7, 64, seed=1, step=2)
    assert len(set(ids.tolist())) == 64 and int(ids.max()) < 10**7
    counts = torch.zeros(10)
    for step in range(500):
        counts += torch.bincount(draw_uniform_ids(10, 3, seed=0, step=step), minlength=10)
    assert float(counts.min()) > 100 and float(counts.max()) < 200  # 150 each on average
    # Greedy never picks the 10 far prompts; with epsilon some slots are uniform.
    cfg = SelectionConfig(selection_epsilon=0.5)
    picked = torch.cat([select_prompts(acc, 40, cfg, seed=0, step=s) for s in range(50)])
    assert bool((picked < 10).any())
    assert not bool((select_prompts(acc, 40, SelectionConfig(), seed=0, step=0) < 10).any())


def test_deterministic_and_split_independent_randomness():
    assert torch.equal(block_uniforms(0, 200_000, seed=3, step=4, stream=1)[70_000:130_001],
                       block_uniforms(70_000, 130_001, seed=3, step=4, stream=1))
    a = select_prompts(torch.rand(500, dtype=torch.float64), 20, SelectionConfig(), seed=5, step=9)
    b = select_prompts(torch.rand(500, dtype=torch.float64), 20, SelectionConfig(), seed=5, step=9)
    assert not torch.equal(a, b)  # different tables, different picks
    acc = torch.rand(500, dtype=torch.float64)
    for cfg in (SelectionConfig(), SelectionConfig(prompt_selection="paced-soft")):
        assert torch.equal(select_prompts(acc, 20, cfg, seed=5, step=9),
                           select_prompts(acc, 20, cfg, seed=5, step=9))


@pytest.mark.parametrize("field, value", [("target_acc", 0.0), ("target_acc", 1.0),
                                          ("target_acc", 1.5), ("selection_epsilon", -0.1),
                                          ("selection_temperature", 0.0)])
def test_bad_settings_name_the_flag(field, value):
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} {value}"):
        SelectionConfig(**{field: value}).validate()


def test_more_prompts_than_the_table():
    with pytest.raises(ConfigError, match="--num-prompts-per-step 11"):
        select_prompts(torch.zeros(10, dtype=torch.float64), 11, SelectionConfig(), seed=0, step=0)
    table = ShardedLogZ(10, beta=0.05, init_acc=0.5, lr=0.1)
    with pytest.raises(ConfigError, match="--num-prompts-per-step 11"):
        PromptSelector(SelectionConfig(selection_gather_max=0), seed=0).select(table, 11, 0)
    assert not math.isnan(float(table.values.sum()))


def test_resume_reports_changed_selection_settings():
    saved = PromptSelector(SelectionConfig(prompt_selection="paced-greedy"), seed=3).state_dict()
    same = PromptSelector(SelectionConfig(prompt_selection="paced-greedy"), seed=3)
    assert same.load_state_dict(saved) == []
    other = PromptSelector(SelectionConfig(prompt_selection="uniform", target_acc=0.4), seed=4)
    assert other.load_state_dict(saved) == [
        "--prompt-selection uniform (checkpoint: paced-greedy)", "--seed 4 (checkpoint: 3)",
        "--target-acc 0.4 (checkpoint: 0.5)"]


def test_grpo_selects_uniformly_by_default_and_refuses_a_paced_rule():
    """GRPO (and FlowRL with its own ProjZ head) trains no log-Z table: every row stays at
    tau, so a paced rule would return the same tie order every step (the same prompts
    forever)."""
    from megatron_paced.job import parse_args
    from megatron_paced.validation import validate_batch

    assert parse_args(["--algo", "grpo"]).selection.prompt_selection == "uniform"
    assert parse_args([]).selection.prompt_selection == "paced-greedy"
    assert parse_args(["--algo", "flowrl"]).selection.prompt_selection == "uniform"
    assert parse_args(["--algo", "flowrl", "--flowrl-log-z", "table"]
                      ).selection.prompt_selection == "paced-greedy"
    validate_batch(parse_args(["--algo", "grpo"]), dp_size=1)
    validate_batch(parse_args(["--algo", "flowrl"]), dp_size=1)
    with pytest.raises(ConfigError, match="--prompt-selection paced-soft with --algo grpo"):
        validate_batch(parse_args(["--algo", "grpo", "--prompt-selection", "paced-soft"]), 1)
    with pytest.raises(ConfigError, match="FlowRL with --flowrl-log-z proj-z trains no"):
        validate_batch(parse_args(["--algo", "flowrl", "--prompt-selection", "paced-soft"]), 1)
    with pytest.raises(ConfigError, match="--log-z-param hybrid with --algo flowrl"):
        validate_batch(parse_args(["--algo", "flowrl", "--log-z-param", "hybrid"]), 1)
    # A free estimate that is not log Z (MoPPS's Beta posterior) lets GRPO select.
    validate_batch(parse_args(["--algo", "grpo", "--prompt-selection", "paced-greedy",
                               "--acc-estimator", "beta-posterior"]), 1)
    with pytest.raises(ConfigError, match="'oracle': reads the accuracy of sampling at"):
        validate_batch(parse_args(["--acc-estimator", "oracle", "--temperature", "0.7"]), 1)
    with pytest.raises(ConfigError, match="--eval-train-accuracy 'oracle': reads the accuracy"):
        validate_batch(parse_args(["--eval-train-accuracy", "--temperature", "0.7"]), 1)
    with pytest.raises(ConfigError, match="the oracle is exact: nothing to probe"):
        validate_batch(parse_args(["--acc-estimator", "oracle", "--calibration-interval",
                                   "5"]), 1)
    with pytest.raises(ConfigError, match="--beta-posterior-decay 1.5"):
        parse_args(["--beta-posterior-decay", "1.5"]).selection.validate()
    for flag, value in (("--flowrl-proj-z-layers", "0"), ("--flowrl-proj-z-dropout", "1"),
                        ("--flowrl-weight-max", "0"), ("--flowrl-reward-scale", "nan")):
        with pytest.raises(ConfigError, match=flag):
            validate_batch(parse_args(["--algo", "flowrl", flag, value]), 1)
    # What the refusal prevents: with every estimate at tau, greedy picks the same prompts.
    acc = torch.full((64,), 0.5, dtype=torch.float64)
    tie = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picks = [select_prompts(acc, 8, SelectionConfig(), seed=0, step=s, tie_uniforms=tie)
             for s in range(3)]
    assert all(torch.equal(picks[0], p) for p in picks)


@pytest.mark.parametrize("rule", ["paced-greedy", "paced-soft"])
def test_prompts_in_flight_are_excluded_the_same_by_both_paths(rule):
    """--max-staleness: the prompts selected for steps still in flight are kept out of the
    paced part; the all-reduce path and the pool path (large tables) pick the same rows,
    the best ones outside the exclusion; an exclusion leaving too few prompts is ignored."""
    table = ShardedLogZ(200, beta=0.05, init_acc=0.5, lr=0.5)
    table.apply_gradients(torch.arange(200), torch.linspace(-8, 8, 200))  # spread estimates
    exclude = torch.arange(90, 110)  # the 20 nearest tau = 0.5
    picks = {}
    for gather_max in (10**6, 0):
        cfg = SelectionConfig(prompt_selection=rule, selection_gather_max=gather_max,
                              selection_temperature=0.05)
        selector = PromptSelector(cfg, seed=5)
        picks[gather_max] = selector.select(table, 10, step=3, exclude=exclude)
        assert not set(picks[gather_max].tolist()) & set(exclude.tolist())
        assert selector.select(table, 10, step=3, exclude=torch.arange(195)).tolist() == \
            selector.select(table, 10, step=3).tolist()  # 5 left < 10: ignored
    assert picks[10**6].tolist() == picks[0].tolist()
    if rule == "paced-greedy":
        distance = (table.gather_acc_est() - 0.5).abs()
        distance[exclude] = math.inf
        assert set(picks[0].tolist()) == set(torch.topk(-distance, 10).indices.tolist())
