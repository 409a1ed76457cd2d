"""Rewards: math-verify answers in worker processes, time limits, crashes, the registry."""

from __future__ import annotations

import psutil
import pytest
import torch

from megatron_paced.rewards import MathVerifyReward, get_reward
from megatron_paced.verifiers import final_answer_text, math_verify_score
from tests.helpers.scorers import slow_when_asked


@pytest.mark.parametrize("completion, answer, expected", [
    ("So the total is \\boxed{18}.", "18", 1.0),
    ("She makes 9 * 2 = 18 dollars.\n#### 18", "18", 1.0),
    ("#### 17", "18", 0.0),
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so \\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    ("no answer at all", "18", 0.0),
])
def test_math_verify_scores(completion, answer, expected):
    assert math_verify_score(completion, answer) == expected


def test_final_answer_text():
    assert final_answer_text("a #### 1 #### 2") == "2"
    assert final_answer_text("\\boxed{3}") == "\\boxed{3}"


def test_pool_scores_in_order_and_survives_timeouts_crashes_and_errors(tmp_path, monkeypatch):
    pid_file = tmp_path / "sleeper.pid"
    monkeypatch.setenv("SCORER_PID_FILE", str(pid_file))  # inherited by the spawned workers
    reward = MathVerifyReward(num_workers=2, timeout_s=1.5, score_fn=slow_when_asked)
    try:
        result = reward(["a", "sleep", "b", "crash", "raise", "c"], ["a", "x", "x", "x", "x", "c"])
        assert result.scores.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert result.num_timeouts == 1 and result.num_errors == 2
        # The timed-out worker was killed, not waited for (it sleeps 600 s otherwise).
        sleeper = int(pid_file.read_text())
        try:
            assert psutil.Process(sleeper).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
        again = reward(["a", "b"], ["a", "a"])  # replaced workers keep serving
        assert again.scores.tolist() == [1.0, 0.0] and again.num_timeouts == 0
    finally:
        reward.close()


def test_registry():
    math_reward = get_reward("math", num_workers=1, timeout_s=20.0)
    try:
        result = math_reward(["\\boxed{4}", "\\boxed{5}"], ["4", "4"])
        assert result.scores.tolist() == [1.0, 0.0] and result.scores.dtype == torch.float32
    finally:
        math_reward.close()
    assert get_reward("exact")([" 12 ", "13"], ["12", "12"]).scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="--reward 'nope'"):
        get_reward("nope")
    with pytest.raises(ValueError, match="--reward-timeout 0"):
        MathVerifyReward(timeout_s=0)
