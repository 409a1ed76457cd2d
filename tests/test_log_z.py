"""The log-Z table on one rank, and Proposition 4.1 on a bandit with known success rates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_paced.losses import paced_tb_delta
from megatron_paced.paced.log_z import LogZConfig, ShardedLogZ


def test_lookup_and_per_prompt_mean_sgd_step():
    table = ShardedLogZ(10, beta=0.05, init_acc=0.5, lr=0.5)
    ids = torch.tensor([3, 3, 7, 3])
    torch.testing.assert_close(table.lookup(ids), torch.full((4,), 10.0))
    table.apply_gradients(ids, torch.tensor([2.0, 4.0, -1.0, 6.0]))
    # row 3: mean grad 4 -> 10 - 0.5 * 4; row 7: mean grad -1 -> 10.5; others untouched
    torch.testing.assert_close(table.lookup(torch.tensor([3, 7, 0])),
                               torch.tensor([8.0, 10.5, 10.0]))
    assert table.visits.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    torch.testing.assert_close(table.gather_acc_est()[[3, 7]], torch.tensor([0.4, 0.525],
                                                                            dtype=torch.float64))


def test_bad_ids_and_nan_gradients_write_nothing():
    table = ShardedLogZ(10, beta=0.05, init_acc=0.5, lr=0.5, optimizer="adam")
    before = {k: getattr(table, k).clone() for k in table._STATE}
    with pytest.raises(ValueError, match="log-Z row 10 is outside the table of 10"):
        table.lookup(torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="log-Z row -1"):
        table.apply_gradients(torch.tensor([-1]), torch.tensor([1.0]))
    with pytest.raises(FloatingPointError, match="table is unchanged"):
        table.apply_gradients(torch.tensor([1, 2]), torch.tensor([1.0, float("nan")]))
    for key, value in before.items():
        assert torch.equal(getattr(table, key), value), key


def test_config_and_constructor_validation():
    with pytest.raises(ValueError, match="--beta 0"):
        ShardedLogZ(4, beta=0, init_acc=0.5, lr=0.1)
    with pytest.raises(ValueError, match="--log-z-lr -0.1"):
        LogZConfig(log_z_lr=-0.1).validate()
    with pytest.raises(ValueError, match="--log-z-init-acc 1.5"):
        LogZConfig(log_z_init_acc=1.5).validate()


def run_bandit(*, lr_log_z: float, lr_policy: float, steps: int = 1500, num_prompts: int = 256,
               group_size: int = 8, prompts_per_step: int = 16, beta: float = 0.05, seed: int = 0):
    """Per-prompt two-armed bandit: arm 1 pays 1, arm 0 pays 0; the policy is a logit per
    prompt trained with the PACED loss (on-policy: pi_old is the policy before the step).
    Returns |beta log_z - p| over visited prompts, the per-step beta KL(pi_old || pi_theta),
    and the success rates before and after."""
    gen = torch.Generator().manual_seed(seed)
    p_start = torch.linspace(0.05, 0.95, num_prompts, dtype=torch.float64)[
        torch.randperm(num_prompts, generator=gen)]
    logits = torch.log(p_start / (1 - p_start)).requires_grad_(True)
    table = ShardedLogZ(num_prompts, beta=beta, init_acc=0.5, lr=lr_log_z)
    beta_kls = []
    for _ in range(steps):
        ids = torch.randint(0, num_prompts, (prompts_per_step,), generator=gen)
        ids = ids.repeat_interleave(group_size)
        with torch.no_grad():
            p_old = torch.sigmoid(logits[ids])
        rewards = (torch.rand(len(ids), generator=gen, dtype=torch.float64) < p_old).double()
        log_probs = rewards * F.logsigmoid(logits[ids]) + (1 - rewards) * F.logsigmoid(-logits[ids])
        log_z = table.lookup(ids).double().requires_grad_(True)
        delta = paced_tb_delta(log_z, log_probs, log_probs.detach(), rewards, beta)
        logits.grad = None
        (delta ** 2).mean().backward()
        with torch.no_grad():
            logits -= lr_policy * logits.grad
            p_new = torch.sigmoid(logits[ids])
            kl = (p_old * torch.log(p_old / p_new)
                  + (1 - p_old) * torch.log((1 - p_old) / (1 - p_new)))
            beta_kls.append(float(beta * kl.mean()))
        table.apply_gradients(ids, log_z.grad * len(ids))  # d sum(delta^2) / d log_z = 2 delta
    p_end = torch.sigmoid(logits.detach())
    visited = table.visits > 0
    errors = (table.local_acc_est()[visited] - p_end[visited]).abs()
    return errors, torch.tensor(beta_kls), p_start, p_end


def test_proposition_4_1_beta_log_z_tracks_online_accuracy():
    errors, beta_kls, p_start, p_end = run_bandit(lr_log_z=0.05, lr_policy=0.02)
    assert len(errors) == 256
    assert float(errors.mean()) <= 0.05, float(errors.mean())
    assert float(beta_kls.mean()) <= 4e-3 and float(beta_kls.max()) <= 4e-3
    # The policy really moved, so the estimate tracked a moving target.
    assert float((p_end - p_start).abs().mean()) > 0.1
    # And it beats one group's observed accuracy (G = 8 samples: mean error ~0.13).
    assert float(errors.mean()) < 0.5 * float(
        torch.sqrt(p_end * (1 - p_end) / 8).mean())


def test_estimate_is_wrong_without_the_partition_update():
    # Control: with the table frozen the estimate stays at its initialization.
    errors, _, _, _ = run_bandit(lr_log_z=1e-9, lr_policy=0.02, steps=300)
    assert float(errors.mean()) > 0.15


def test_flags_and_init_default_to_tau():
    import argparse

    from megatron_paced.config import add_flags, from_args
    from megatron_paced.paced.log_z import build_log_z_table
    from megatron_paced.paced.replay import ReplayConfig
    from megatron_paced.paced.selection import SelectionConfig

    parser = argparse.ArgumentParser()
    for cls in (LogZConfig, SelectionConfig, ReplayConfig):
        add_flags(parser, cls)
    args = parser.parse_args([
        "--log-z-lr", "0.2", "--prompt-selection", "paced-soft", "--target-acc", "0.3",
        "--selection-epsilon", "0.1", "--replay-size", "64", "--replay-per-step", "8",
        "--replay-priority", "uniform"])
    logz, selection, replay = (from_args(c, args) for c in (LogZConfig, SelectionConfig,
                                                            ReplayConfig))
    assert (logz.log_z_lr, selection.prompt_selection, replay.replay_priority) == \
        (0.2, "paced-soft", "uniform")
    table = build_log_z_table(8, logz, beta=0.05, target_acc=selection.target_acc)
    torch.testing.assert_close(table.gather_acc_est(), torch.full((8,), 0.3, dtype=torch.float64))
    table = build_log_z_table(8, LogZConfig(log_z_init_acc=0.9), beta=0.05, target_acc=0.3)
    torch.testing.assert_close(table.gather_acc_est(), torch.full((8,), 0.9, dtype=torch.float64))
