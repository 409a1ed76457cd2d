"""The log-Z table on one rank, and Proposition 4.1 on a bandit with known success rates."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_paced.paced.learned_log_z import build_log_z_table
from megatron_paced.paced.log_z import LogZConfig, ShardedLogZ
from megatron_paced.rollout.engine import RolloutBatch


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


def test_running_mean_step_averages_the_visits_then_forgets():
    """The k-th visit moves a row max(1/k, min_step) of the way to that visit's optimum
    (mean_grad / 2 = log_z - optimum): the mean of the first visits, then an EMA."""
    beta = 0.05
    table = ShardedLogZ(4, beta=beta, init_acc=0.5, lr=123.0, optimizer="running-mean",
                        min_step=0.25)
    row = torch.tensor([1, 1])
    visit_acc = [0.25, 0.75, 1.0, 0.0, 0.5, 0.5]
    expected, means = 0.5, []
    for k, acc in enumerate(visit_acc, start=1):
        log_z = table.lookup(row).double()
        table.apply_gradients(row, 2 * (log_z - acc / beta))  # optimum: acc / beta
        fraction = max(1 / k, 0.25)
        expected += fraction * (acc - expected)
        means.append(float(table.acc_est(row[:1])))
        assert abs(means[-1] - expected) < 1e-6, (k, means[-1], expected)
    assert means[:3] == pytest.approx([0.25, 0.5, 2 / 3])  # exact means of the first visits
    assert table.visits.tolist() == [0, 6, 0, 0]
    with pytest.raises(ValueError, match="--log-z-min-step 0"):
        LogZConfig(log_z_optimizer="running-mean", log_z_min_step=0).validate()


def test_bad_ids_and_nan_gradients_write_nothing():
    table = ShardedLogZ(10, beta=0.05, init_acc=0.5, lr=0.5, optimizer="adam")
    before = {k: v.clone() for k, v in table.state_tensors().items()}
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


def _arm_log_probs(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor):
    """(B, 1) log-prob of the arm each row pulled (its one token) under per-prompt logits."""
    arm = tokens[:, :1].double()
    return arm * F.logsigmoid(logits[rows])[:, None] + (1 - arm) * F.logsigmoid(
        -logits[rows])[:, None]


def run_bandit(*, steps: int = 300, num_prompts: int = 256, group_size: int = 8,
               prompts_per_step: int = 16, beta: float = 0.05, lr_policy: float = 0.02,
               log_z: LogZConfig = LogZConfig(),
               mutation: str | None = None, seed: int = 0):
    """Per-prompt two-armed bandit through the trainer's own pieces: arm 1 pays 1, arm 0 pays
    0, the policy is a logit per prompt. Each step samples G arms of P prompts from pi_old,
    offers and draws replayed successes (:func:`offer_and_draw`, 16 per step), builds the
    batch (:func:`build_train_batch`), and takes a policy step with :func:`paced_loss_fn` and
    the table's step (:func:`log_z_step`). pi_old is the policy one step behind (as with
    asynchronous rollouts), so S_theta != S_old: the KL term is not zero.

    ``mutation`` breaks one piece, to show the checks below catch it: ``flip`` the sign of
    S_theta - S_old, ``sum`` a row's gradients instead of their mean, ``replay`` lets
    replayed rows update the table. Returns |beta log_z - p| over visited prompts, the
    per-step beta KL(pi_old || pi_theta), and the success rates before and after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 256 logits: threads only add overhead
    try:
        return _bandit(steps, num_prompts, group_size, prompts_per_step, beta, lr_policy,
                       log_z, mutation, seed)
    finally:
        torch.set_num_threads(threads)


def _bandit(steps, num_prompts, group_size, prompts_per_step, beta, lr_policy, log_z,
            mutation, seed):
    from megatron_paced import losses
    from megatron_paced.paced.replay import DistributedReplay, ReplayConfig, offer_and_draw
    from megatron_paced.rl.batch import build_train_batch
    from megatron_paced.rl.optimize import log_z_step

    gen = torch.Generator().manual_seed(seed)
    p_start = torch.linspace(0.05, 0.95, num_prompts, dtype=torch.float64)[
        torch.randperm(num_prompts, generator=gen)]
    logits = torch.log(p_start / (1 - p_start)).requires_grad_(True)
    logits_old = logits.detach().clone()  # pi_old: the policy one step behind
    table = build_log_z_table(num_prompts, log_z, beta=beta, target_acc=0.5)
    replay = DistributedReplay(ReplayConfig(replay_size=128, replay_per_step=16),
                               num_prompts=num_prompts, seed=seed)
    def flipped(log_z, log_probs, old_log_probs, rewards, beta):
        return log_z - (log_probs - old_log_probs) - rewards / beta

    delta_fn = flipped if mutation == "flip" else losses.paced_tb_delta
    beta_kls = []
    for step in range(steps):
        rows = torch.randperm(num_prompts, generator=gen)[:prompts_per_step]
        with torch.no_grad():
            p_old = torch.sigmoid(logits_old[rows]).repeat_interleave(group_size)
        arms = (torch.rand(len(p_old), generator=gen, dtype=torch.float64) < p_old).long()
        rewards = arms.double().reshape(prompts_per_step, group_size)
        tokens = arms[:, None]
        fresh_rows = rows.repeat_interleave(group_size)
        with torch.no_grad():
            rollout = _arm_log_probs(logits_old, fresh_rows, tokens).float()
        fresh = RolloutBatch(tokens, torch.ones(len(tokens), 1), rollout)
        acc_est = table.acc_est(rows)
        replayed = offer_and_draw(replay, rows, acc_est, fresh, rewards, step=step,
                                  version=step)
        batch = build_train_batch(rows, fresh, rewards, replayed)
        batch_rows = batch.log_z_rows
        with torch.no_grad():  # pi_old of every row, replayed ones too (the default)
            old_log_probs = _arm_log_probs(logits_old, batch_rows, batch.tokens)
            p_before = torch.sigmoid(logits_old[rows])
            logits_old = logits.detach().clone()  # the next step's pi_old
        updates = torch.ones_like(batch.updates_log_z) if mutation == "replay" \
            else batch.updates_log_z
        batch = dataclasses.replace(
            batch, old_log_probs=old_log_probs, updates_log_z=updates,
            rewards=batch.rewards.double(),
            log_z=table.lookup(batch_rows).double().requires_grad_(True))
        logits.grad = None
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(losses, "paced_tb_delta", delta_fn)
            loss_sum, num, _ = losses.paced_loss_fn(
                _arm_log_probs(logits, batch_rows, batch.tokens), batch, beta=beta)
        loss_sum.backward()
        with torch.no_grad():
            logits -= lr_policy * logits.grad / float(num)
        grads = batch.log_z.grad
        if mutation == "sum":  # each row moved by the sum of its samples' gradients
            grads = grads * torch.bincount(batch_rows, minlength=num_prompts)[batch_rows]
        log_z_step(table, batch, grads)
        with torch.no_grad():
            p_new = torch.sigmoid(logits[rows])
            kl = (p_before * torch.log(p_before / p_new)
                  + (1 - p_before) * torch.log((1 - p_before) / (1 - p_new)))
            beta_kls.append(float(beta * kl.mean()))
    p_end = torch.sigmoid(logits.detach())
    visited = table.visits > 0
    errors = (table.local_acc_est()[visited] - p_end[visited]).abs()
    return errors, torch.tensor(beta_kls), p_start, p_end


def _proposition_4_1_holds(errors, beta_kls, p_start, p_end) -> list[str]:
    """What Proposition 4.1 (and a working trainer) promise on the bandit; the failures."""
    failed = []
    if float(errors.mean()) > 0.05:
        failed.append(f"estimate error {float(errors.mean()):.3f} > 0.05")
    if not float(beta_kls.mean()) <= 4e-3:
        failed.append(f"beta KL {float(beta_kls.mean()):.2e} > 4e-3")
    if not float(p_end.mean()) > float(p_start.mean()) + 0.02:
        failed.append(f"no learning: mean p {float(p_start.mean()):.3f} -> "
                      f"{float(p_end.mean()):.3f}")
    # And it beats one group's observed accuracy (G = 8 samples: mean error ~0.13).
    if not float(errors.mean()) < 0.5 * float(torch.sqrt(p_end * (1 - p_end) / 8).mean()):
        failed.append("no better than one group of 8")
    return failed


def test_proposition_4_1_beta_log_z_tracks_online_accuracy():
    errors, beta_kls, p_start, p_end = run_bandit()
    assert len(errors) == 256
    assert _proposition_4_1_holds(errors, beta_kls, p_start, p_end) == []
    assert float(beta_kls.mean()) > 0  # the KL term was not zero


@pytest.mark.parametrize("mutation, expected", [
    ("flip", "no learning"), ("sum", "estimate error"), ("replay", "estimate error")])
def test_bandit_catches_a_broken_trainer(mutation, expected):
    """Mutation checks: each broken piece makes the check above fail, as it should."""
    failed = _proposition_4_1_holds(*run_bandit(mutation=mutation, steps=150))
    assert any(f.startswith(expected) for f in failed), failed


def test_estimate_is_wrong_without_the_partition_update():
    # Control: with the table nearly frozen the estimate stays near its initialization.
    errors, _, _, _ = run_bandit(log_z=LogZConfig(log_z_optimizer="sgd", log_z_lr=1e-9),
                                 steps=300)
    assert float(errors.mean()) > 0.15


def test_flags_and_init_default_to_tau():
    import argparse

    from megatron_paced.config import add_flags, from_args
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


@pytest.mark.parametrize("anchor", ["recompute", "engine"])
def test_under_staleness_log_z_estimates_the_generating_weights(anchor):
    """--max-staleness K: the samples come from weights K steps older than pi_old. Through the
    trainer's loss and log-Z step, with theta = pi_old when the gradient is taken:
    recompute anchor (S_old = pi_old's): beta * log Z -> the generating weights' accuracy;
    engine anchor (S_old = the generator's): -> that accuracy + beta * KL(pi_gen || pi_old).
    A one-armed bandit: the generator succeeds with 0.2, pi_old with 0.8."""
    from megatron_paced import losses
    from megatron_paced.rl.batch import RLBatch

    beta, group, p_gen, p_old = 0.05, 8, 0.2, 0.8
    gen = torch.Generator().manual_seed(0)
    table = ShardedLogZ(1, beta=beta, init_acc=0.5, lr=0.0, optimizer="running-mean",
                        min_step=1e-4)
    log_p = {"gen": torch.log(torch.tensor([1 - p_gen, p_gen], dtype=torch.float64)),
             "old": torch.log(torch.tensor([1 - p_old, p_old], dtype=torch.float64))}
    for _ in range(2000):
        arms = (torch.rand(group, generator=gen, dtype=torch.float64) < p_gen).long()
        theta = log_p["old"][arms][:, None]  # pi_old: the policy has not stepped yet
        anchor_log_probs = log_p["old" if anchor == "recompute" else "gen"][arms][:, None]
        log_z = table.lookup(torch.zeros(group, dtype=torch.long)).double().requires_grad_(True)
        batch = RLBatch(arms[:, None], torch.ones(group, 1, dtype=torch.float64),
                        log_z_rows=torch.zeros(group, dtype=torch.long),
                        updates_log_z=torch.ones(group, dtype=torch.bool),
                        rewards=arms.double(), advantages=torch.zeros(group),
                        old_log_probs=anchor_log_probs, log_z=log_z)
        loss_sum, _, _ = losses.paced_loss_fn(theta, batch, beta=beta)
        loss_sum.backward()
        table.apply_gradients(batch.log_z_rows, log_z.grad)
    kl_gen_old = p_gen * math.log(p_gen / p_old) + (1 - p_gen) * math.log((1 - p_gen) / (1 - p_old))
    expected = p_gen + (beta * kl_gen_old if anchor == "engine" else 0.0)
    estimate = float(table.acc_est(torch.tensor([0])))
    assert abs(estimate - expected) < 0.012, (estimate, expected)
    assert abs(estimate - p_old) > 0.5  # not pi_old's accuracy
