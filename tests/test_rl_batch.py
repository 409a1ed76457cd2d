"""The RL step's pure stages on one process, no launch: the train batch from fresh groups and
replayed samples, and replay's offer/draw."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_paced.paced.replay import DistributedReplay, ReplayConfig, ReplaySample, \
    offer_and_draw
from megatron_paced.rl.batch import build_train_batch
from megatron_paced.rollout.engine import RolloutBatch

T = 5


def _fresh(num_rows: int) -> RolloutBatch:
    """Rows whose tokens and log-probs say which row they are."""
    tokens = torch.arange(num_rows)[:, None].repeat(1, T)
    mask = torch.tensor([0, 0, 1, 1, 0.0]).repeat(num_rows, 1)
    log_probs = -torch.arange(num_rows, dtype=torch.float32)[:, None].repeat(1, T)
    return RolloutBatch(tokens, mask, log_probs)


def _replayed(row: int, reward: float, marker: int) -> ReplaySample:
    return ReplaySample(row, torch.full((T,), marker), torch.ones(T),
                        torch.full((T,), -100.0 - marker), reward, policy_version=3)


def test_train_batch_is_fresh_groups_then_replayed_rows():
    prompt_rows = torch.tensor([7, 2])
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    replayed = [_replayed(5, 1.0, 50), _replayed(7, 0.5, 51)]
    batch = build_train_batch(prompt_rows, _fresh(6), rewards, replayed)
    assert batch.num_sequences == 8
    assert batch.tokens[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 50, 51]  # (prompt, sample) order
    assert batch.log_z_rows.tolist() == [7, 7, 7, 2, 2, 2, 5, 7]
    assert batch.rewards.tolist() == [1, 0, 0, 1, 1, 1, 1.0, 0.5]
    # Generator's log-probs as pi_old: the fresh rows' rollout ones, the replayed rows' stored.
    assert batch.old_log_probs[:, 0].tolist() == [0, -1, -2, -3, -4, -5, -150, -151]
    assert torch.equal(batch.completion_mask[6], torch.ones(T))
    advantages = batch.advantages
    # Group 0: rewards (1, 0, 0), mean 1/3, std sqrt(1/3); group 1 all equal; replayed alone.
    std = (1 / 3) ** 0.5
    torch.testing.assert_close(advantages[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / std,
                               atol=1e-4, rtol=1e-4)
    assert advantages[3:].abs().max() < 1e-6


def test_train_batch_without_replay_and_shape_errors():
    batch = build_train_batch(torch.tensor([4]), _fresh(2), torch.tensor([[0.0, 1.0]]), [])
    assert batch.num_sequences == 2 and batch.log_z_rows.tolist() == [4, 4]
    with pytest.raises(ValueError, match="3 fresh rows for 1 prompts and \\(1, 2\\) rewards"):
        build_train_batch(torch.tensor([4]), _fresh(3), torch.tensor([[0.0, 1.0]]), [])


def test_offer_and_draw_keeps_the_largest_estimate_errors_and_shares_the_draw():
    replay = DistributedReplay(ReplayConfig(replay_size=3, replay_per_step=4), num_prompts=10,
                               seed=0)
    prompt_rows = torch.tensor([1, 2, 3])
    acc_est = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    # Observed accuracies 0.5, 0.5, 1.0: errors 0.4, 0.0, 0.8; only successes are offered.
    rewards = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    mine = offer_and_draw(replay, prompt_rows, acc_est, _fresh(6), rewards, step=4, version=3,
                          dp_rank=1, dp_size=2)
    assert mine == []  # the draw precedes the offer: nothing is drawn in the step adding it
    kept = sorted((s.row, round(s.priority, 6), s.acc_obs) for s in replay.items)
    assert kept == [(1, 0.4, 0.5), (3, 0.8, 1.0), (3, 0.8, 1.0)]  # prompt 2's success lost
    assert all(s.policy_version == 3 and s.reward == 1.0 for s in replay.items)
    stored = list(replay.items)
    mine = offer_and_draw(replay, torch.tensor([4]), torch.tensor([0.5], dtype=torch.float64),
                          _fresh(2), torch.tensor([[0.0, 0.0]]), step=5, version=4,
                          dp_rank=1, dp_size=2)
    drawn = replay.sample(5)  # the same draw again: this rank's share is its second half
    assert len(mine) == 2 and [s.insertion for s in mine] == [s.insertion for s in drawn[2:]]
    for sample in mine:  # a stored row is the fresh row it came from, with its log-probs
        assert any(sample is s for s in stored)
        row = int(sample.tokens[0])
        assert sample.row == int(prompt_rows[row // 2])
        assert sample.old_log_probs.tolist() == [-float(row)] * T


def test_rescore_measures_priorities_against_the_current_estimate():
    replay = DistributedReplay(ReplayConfig(replay_size=4, replay_per_step=2), num_prompts=10,
                               seed=0)
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    offer_and_draw(replay, torch.tensor([1, 3]), torch.tensor([0.9, 0.2], dtype=torch.float64),
                   _fresh(4), rewards, step=1, version=0)
    assert sorted(round(s.priority, 6) for s in replay.items) == [0.4, 0.8, 0.8]
    now = torch.zeros(10, dtype=torch.float64)
    now[1], now[3] = 0.5, 0.75  # estimates after later updates
    offer_and_draw(replay, torch.tensor([5]), torch.tensor([0.5], dtype=torch.float64),
                   _fresh(2), torch.tensor([[0.0, 0.0]]), step=2, version=1,
                   local_acc_est=lambda rows: now[rows])
    assert sorted((s.row, round(s.priority, 6)) for s in replay.items) == \
        [(1, 0.0), (3, 0.25), (3, 0.25)]


def test_replayed_rows_train_the_policy_but_do_not_move_log_z():
    """Proposition 4.1 is about samples from pi_old: a replayed success counted like a fresh
    group pulls a row seen only through replay from 0.5 to 1.0 (SGD lr 0.5, which jumps to
    the step's optimum), and a fresh group at 0.25 (1 of 4) plus one replayed success to 0.4
    (2 of 5). Only fresh rows reach the table."""
    from megatron_paced.paced.log_z import ShardedLogZ
    from megatron_paced.rl.optimize import log_z_step

    beta = 0.05
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # prompt 2: observed accuracy 0.25
    replayed = [_replayed(2, 1.0, 50), _replayed(6, 1.0, 51)]  # prompt 6: only via replay
    batch = build_train_batch(torch.tensor([2]), _fresh(4), rewards, replayed)
    assert batch.updates_log_z.tolist() == [True] * 4 + [False] * 2
    assert build_train_batch(torch.tensor([2]), _fresh(4), rewards, replayed,
                             replay_updates_log_z=True).updates_log_z.all()
    for mask_replayed, expected in ((True, {2: 0.25, 6: 0.5}), (False, {2: 0.4, 6: 1.0})):
        table = ShardedLogZ(10, beta=beta, init_acc=0.5, lr=0.5)  # lr 0.5: to the optimum
        rows = batch.log_z_rows
        log_z = table.lookup(rows).double()
        grads = 2 * (log_z - batch.rewards.double() / beta)  # S_theta = S_old
        if not mask_replayed:  # replayed rows counted too (--replay-updates-log-z)
            batch = dataclasses.replace(batch, updates_log_z=torch.ones(6, dtype=torch.bool))
        log_z_step(table, batch, grads)
        got = {row: round(float(table.acc_est(torch.tensor([row]))), 4) for row in expected}
        assert got == {row: round(value, 4) for row, value in expected.items()}


def test_sequence_kl_on_samples_of_pi_old_is_the_exact_kl():
    """The probe's estimator (rl.old_log_probs.sequence_kl): on fresh samples of pi_old, the
    mean of S_old - S_new is KL(pi_old || pi_new), here of 3 independent tokens over a
    vocabulary of 5: within 4 standard errors of the exact value, on both sides."""
    from megatron_paced.rl.old_log_probs import sequence_kl

    gen = torch.Generator().manual_seed(3)
    old = torch.log_softmax(torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0], dtype=torch.float64), -1)
    new = torch.log_softmax(torch.tensor([0.3, 0.8, -1.2, 0.9, 1.7], dtype=torch.float64), -1)
    exact = 3 * float((old.exp() * (old - new)).sum())
    tokens = torch.multinomial(old.exp(), 3 * 40000, replacement=True, generator=gen)
    tokens = tokens.view(40000, 3)
    mask = torch.ones(40000, 3, dtype=torch.float64)
    per_sequence = sequence_kl(old[tokens], new[tokens], mask)
    standard_error = float(per_sequence.std()) / 40000 ** 0.5
    assert exact > 10 * standard_error  # a KL the test can tell from 0 and from its negative
    assert abs(float(per_sequence.mean()) - exact) < 4 * standard_error
    masked = sequence_kl(old[tokens], new[tokens], torch.tensor([1.0, 1.0, 0.0]).expand(40000, 3))
    assert abs(float(masked.mean()) - exact * 2 / 3) < 4 * standard_error


def test_mini_batches_take_whole_groups_and_strided_replay_the_same_on_any_dp_size():
    """--num-steps-per-rollout 2: each mini-batch holds whole groups; the union over DP ranks
    of each rank's mini-batch k is the one process's mini-batch k."""
    from megatron_paced.rl.batch import split_for_steps

    num_prompts, group, replayed = 8, 3, 8
    rows = torch.arange(num_prompts)
    rewards = (torch.arange(num_prompts * group) % 2).float().view(num_prompts, group)
    samples = [_replayed(10 + i, 1.0, 60 + i) for i in range(replayed)]

    def minis(dp_rank: int, dp_size: int):
        per_rank, replay_per_rank = num_prompts // dp_size, replayed // dp_size
        mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        batch = build_train_batch(rows[mine], _fresh(num_prompts * group).rows(
            dp_rank * per_rank * group, (dp_rank + 1) * per_rank * group), rewards[mine],
            samples[dp_rank * replay_per_rank:(dp_rank + 1) * replay_per_rank])
        return split_for_steps(batch, 2, num_fresh=per_rank * group, group_size=group)

    def rows_of(batch):  # the rows' identities: the token marker of each row
        return sorted(batch.tokens[:, 0].tolist())

    single = minis(0, 1)
    assert [len(m.log_z_rows) for m in single] == [4 * group + 4] * 2
    assert single[0].log_z_rows[:group].tolist() == [0] * group  # a whole group
    for dp in (2, 4):
        for k in range(2):
            union = sorted(sum((rows_of(minis(r, dp)[k]) for r in range(dp)), []))
            assert union == rows_of(single[k]), (dp, k)
    with pytest.raises(ValueError, match="do not divide into --num-steps-per-rollout 3"):
        split_for_steps(build_train_batch(rows[:2], _fresh(2 * group), rewards[:2], []), 3,
                        num_fresh=2 * group, group_size=group)
