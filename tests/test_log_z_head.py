"""The learned log-Z head (megatron_paced.paced.head) on one process: it starts at tau, and
trained by the TB gradient on some prompts it estimates the accuracy of prompts never drawn."""

from __future__ import annotations

import torch

from megatron_paced.paced.head import LogZHead
from megatron_paced.paced.log_z import per_prompt_mean


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
    features = torch.randn(num_prompts, dim, generator=gen, dtype=torch.float64)
    direction = torch.randn(dim, generator=gen, dtype=torch.float64)
    accuracy = torch.sigmoid(features @ direction)  # a smooth function of the prompt
    head = LogZHead(dim, width=32, beta=beta, init_acc=0.5, lr=3e-3, seed=1)
    torch.testing.assert_close(head.acc_est(features), torch.full((num_prompts,), 0.5,
                                                                 dtype=torch.float64))
    train, held_out = torch.arange(400), torch.arange(400, num_prompts)
    for _ in range(300):  # 16 prompts x 8 samples per step, from the training prompts only
        rows = train[torch.randperm(len(train), generator=gen)[:16]].repeat_interleave(group)
        rewards = (torch.rand(len(rows), generator=gen, dtype=torch.float64)
                   < accuracy[rows]).double()
        with torch.no_grad():
            log_z = head(features[rows])
        prompts, mean_grads = per_prompt_mean(rows, 2 * (log_z - rewards / beta))  # S_theta=S_old
        head.step(features[prompts], mean_grads)
    error = (head.acc_est(features[held_out]).clamp(0, 1) - accuracy[held_out]).abs().mean()
    spread = (accuracy[held_out] - 0.5).abs().mean()
    assert float(error) < 0.06 < float(spread), (float(error), float(spread))
