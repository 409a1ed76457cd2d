"""The learned log-Z head (megatron_paced.paced.head) on one process: it starts at tau, and
trained by the TB gradient on some prompts it estimates the accuracy of prompts never drawn;
the head and hybrid forms of log Z (megatron_paced.paced.learned_log_z) behind the table's
interface, and selection over a candidate pool scored by them."""

from __future__ import annotations

import pytest
import torch

from megatron_paced.paced.learned_log_z import LearnedLogZ, row_uniforms
from megatron_paced.paced.log_z import ShardedLogZ, per_prompt_mean
from megatron_paced.paced.selection import PromptSelector, SelectionConfig


def test_per_prompt_mean():
    rows, means = per_prompt_mean(torch.tensor([3, 1, 3, 3]), torch.tensor([1.0, 2.0, 3.0, 8.0]))
    assert rows.tolist() == [1, 3] and means.tolist() == [2.0, 4.0]


def test_head_starts_at_tau_and_generalizes_to_unseen_prompts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: threads only add overhead
    try:
        _generalizes()
    finally:
        torch.set_num_threads(threads)


def _generalizes():
    beta, num_prompts, dim, group = 0.05, 600, 8, 8
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(num_prompts, dim, generator=gen)
    direction = torch.randn(dim, generator=gen, dtype=torch.float64)
    accuracy = torch.sigmoid(features.double() @ direction)  # a smooth function of the prompt
    train, held_out = torch.arange(400), torch.arange(400, num_prompts)
    log_z = LearnedLogZ(400, param="head", feature_dim=dim, width=32, beta=beta, init_acc=0.5,
                        lr=0.05, optimizer="running-mean", head_lr=1e-3, seed=1)
    log_z.set_features(features[train], features[held_out])
    torch.testing.assert_close(log_z.heldout_acc_est(torch.arange(200)),
                               torch.full((200,), 0.5, dtype=torch.float64))
    for _ in range(60):  # 16 prompts x 8 samples per step, from the training prompts only
        rows = torch.randperm(len(train), generator=gen)[:16].repeat_interleave(group)
        rewards = (torch.rand(len(rows), generator=gen, dtype=torch.float64)
                   < accuracy[rows]).double()
        log_z.apply_gradients(rows, 2 * (log_z.lookup(rows).double() - rewards / beta))
    error = (log_z.heldout_acc_est(torch.arange(200)).clamp(0, 1) - accuracy[held_out]).abs()
    spread = (accuracy[held_out] - 0.5).abs().mean()
    assert float(error.mean()) < 0.08 < float(spread), (float(error.mean()), float(spread))


def _learned(param: str, num_prompts: int = 40, dim: int = 6, **kwargs) -> LearnedLogZ:
    log_z = LearnedLogZ(num_prompts, param=param, feature_dim=dim, width=8, beta=0.05,
                        init_acc=0.5, lr=0.05, optimizer="running-mean", head_lr=0.05, seed=3,
                        **kwargs)
    log_z.set_features(torch.randn(num_prompts, dim, generator=torch.Generator().manual_seed(2)),
                       torch.randn(5, dim, generator=torch.Generator().manual_seed(4)))
    return log_z


def test_hybrid_trained_rows_read_the_table_and_the_rest_follow_the_head():
    hybrid, head = _learned("hybrid", residual_prior=0.0), _learned("head")
    shrunk = _learned("hybrid")  # the default: the head worth 4 visits
    table = ShardedLogZ(40, beta=0.05, init_acc=0.5, lr=0.05, optimizer="running-mean")
    rows = torch.tensor([1, 1, 7, 7, 7, 30])
    grads = torch.tensor([3.0, 5.0, -2.0, -4.0, -6.0, 1.0], dtype=torch.float64)
    others = torch.tensor([0, 2, 20, 39])
    head_before = hybrid.lookup(others)
    for log_z in (hybrid, head, table, shrunk):
        log_z.apply_gradients(rows, grads)
    trained = torch.tensor([1, 7, 30])
    torch.testing.assert_close(hybrid.lookup(trained), table.lookup(trained))
    # With k = 4, a row visited once reads head + 1/5 (table - head).
    torch.testing.assert_close(shrunk.lookup(trained), head.lookup(trained) + (
        table.lookup(trained) - head.lookup(trained)) / 5)
    shrunk.apply_gradients(rows[:1], grads[:1])  # row 1's second visit: 2/6 of the way
    head_now = shrunk._head_of(shrunk.features[trained[:1]])
    torch.testing.assert_close(shrunk.lookup(trained[:1]),
                               head_now + (shrunk.values[trained[:1]] - head_now) * 2 / 6,
                               check_dtype=False)
    # The untrained rows moved with the head (no residual yet), the same in both forms.
    assert float((hybrid.lookup(others) - head_before).abs().min()) > 0
    torch.testing.assert_close(hybrid.lookup(others), head.lookup(others))
    assert hybrid.visits[trained].tolist() == [1, 1, 1] and head.visits.sum() == 3
    assert hybrid.recent_rows().tolist() == [1, 7, 30]  # the head fits trained rows only
    # The table behind either form took the TB optimum of what the loss read.
    torch.testing.assert_close(hybrid.values, table.values)
    torch.testing.assert_close(head.values, table.values)
    assert float((head.lookup(trained) - table.lookup(trained)).abs().max()) > 1e-3
    # Held-out prompts: the head alone; a table can only say its prior.
    index = torch.arange(5)
    assert float((hybrid.heldout_acc_est(index) - 0.5).abs().min()) > 0
    assert table.heldout_acc_est(index).tolist() == [0.5] * 5


def test_a_table_state_loads_as_the_same_log_z_and_bad_features_are_named():
    table = ShardedLogZ(40, beta=0.05, init_acc=0.5, lr=0.05, optimizer="running-mean")
    table.apply_gradients(torch.tensor([3, 3, 9]), torch.tensor([4.0, 2.0, -7.0]))
    state = {name: value.clone() for name, value in table.state_tensors().items()}
    for param in ("hybrid", "head"):
        learned = _learned(param)
        learned.load_state_dict(dict(state), saved_param="table")
        expected = table.gather_acc_est() if param == "hybrid" else torch.full((40,), 0.5,
                                                                              dtype=torch.float64)
        torch.testing.assert_close(learned.gather_acc_est(), expected)
        assert learned.visits.tolist() == table.visits.tolist()
    with pytest.raises(ValueError, match=r"log-Z features of shape \(40, 5\); rows 0..40 need"):
        _learned("hybrid").set_features(torch.zeros(40, 5))


def test_candidate_selection_scores_every_prompt_when_the_pool_covers_them():
    log_z = _learned("hybrid")
    for step in range(20):  # spread the estimates
        rows = torch.randint(0, 40, (8,), generator=torch.Generator().manual_seed(step))
        log_z.apply_gradients(rows, torch.linspace(-20, 20, 8, dtype=torch.float64))
    distance = (log_z.gather_acc_est().clamp(0, 1) - 0.5).abs()
    selector = PromptSelector(SelectionConfig(selection_candidates=64), seed=1)
    chosen = selector.select(log_z, 6, step=3)
    assert sorted(chosen.tolist()) == sorted(torch.argsort(distance)[:6].tolist())
    # A pool smaller than the set: the picks are the best of the drawn pool, all distinct.
    small = PromptSelector(SelectionConfig(selection_candidates=10, selection_epsilon=0.5),
                           seed=1)
    picks = small.select(log_z, 6, step=4)
    assert len(set(picks.tolist())) == 6 and torch.equal(picks, small.select(log_z, 6, step=4))


def test_the_fit_subsample_hash_is_uniform_and_changes_with_the_salt():
    rows = torch.arange(100_000)
    first, second = row_uniforms(rows, 7), row_uniforms(rows, 8)
    counts = torch.histc(first.float(), bins=10, min=0.0, max=1.0)
    assert float((counts - 10_000).abs().max()) < 500, counts
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.02
    assert torch.equal(row_uniforms(rows[5:9], 7), first[5:9])  # a row's value is its own
