"""The priority replay buffer on one process (the DP equivalence runs in paced_worker.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_paced.paced.replay import (
    DistributedReplay, ReplayConfig, ReplaySample, priorities_from_groups,
)


def _sample(row: int, reward: float = 1.0, version: int = 0) -> ReplaySample:
    return ReplaySample(row, torch.arange(4), torch.tensor([0, 1, 1, 0.0]),
                        torch.full((4,), -0.5), reward, version)


def test_priorities_are_estimate_errors():
    acc_est = torch.tensor([0.5, 0.5, 0.2, 0.2])
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([7, 7, 9, 9])
    torch.testing.assert_close(priorities_from_groups(acc_est, rewards, groups),
                               torch.tensor([0.5, 0.5, 0.3, 0.3], dtype=torch.float64))


def test_keeps_highest_priorities_and_successful_samples_only():
    replay = DistributedReplay(ReplayConfig(replay_size=3, replay_per_step=2), num_prompts=10,
                               seed=0)
    size = replay.add([_sample(1), _sample(2, reward=0.0), _sample(3), _sample(4)],
                      torch.tensor([0.1, 0.9, 0.5, 0.2]))
    assert size == 3 and [s.row for s in replay.items] == [1, 3, 4]
    replay.add([_sample(5), _sample(6)], torch.tensor([0.15, 0.05]))
    assert sorted(s.row for s in replay.items) == [3, 4, 5]
    drawn = replay.sample(step=0)
    assert len(drawn) == 2 and all(s.row in (3, 4, 5) for s in drawn)
    assert drawn[0].old_log_probs.tolist() == [-0.5] * 4  # the generating policy's log-probs
    assert [s.row for s in replay.sample(step=0)] == [s.row for s in drawn]


def test_uniform_priority_and_disabled_buffer():
    replay = DistributedReplay(ReplayConfig(replay_size=4, replay_priority="uniform"),
                               num_prompts=10, seed=0)
    replay.add([_sample(i) for i in range(4)], torch.tensor([0.0, 0.0, 0.0, 0.9]))
    assert [s.priority for s in replay.items] == [1.0] * 4
    off = DistributedReplay(ReplayConfig(replay_size=0, replay_per_step=0), num_prompts=10, seed=0)
    assert off.add([_sample(1)], torch.tensor([1.0])) == 0 and off.sample(0) == []


def test_bad_input_adds_nothing():
    replay = DistributedReplay(ReplayConfig(replay_size=4), num_prompts=10, seed=0)
    with pytest.raises(FloatingPointError, match="nothing was added"):
        replay.add([_sample(1), _sample(2)], torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="log-Z row 12 is outside"):
        replay.add([_sample(12)], torch.tensor([0.5]))
    assert replay.items == [] and replay.num_inserted == 0
    with pytest.raises(ValueError, match="--replay-per-step 4: needs --replay-size > 0"):
        ReplayConfig(replay_size=0, replay_per_step=4).validate()


def test_state_round_trip():
    replay = DistributedReplay(ReplayConfig(replay_size=4), num_prompts=10, seed=0)
    replay.add([_sample(i, version=i) for i in range(3)], torch.tensor([0.3, 0.2, 0.1]))
    copy = DistributedReplay(ReplayConfig(replay_size=4), num_prompts=10, seed=0)
    copy.load_state_dict(replay.state_dict())
    assert len(copy.items) == 3
    for a, b in zip(copy.items, replay.items):
        assert (a.row, a.insertion, a.priority, a.reward, a.policy_version) == \
            (b.row, b.insertion, b.priority, b.reward, b.policy_version)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.old_log_probs, b.old_log_probs)
    assert copy.num_inserted == 3
