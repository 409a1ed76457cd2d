"""Vocab-parallel log-probs on one rank: values, gradient, padding mask, argmax flags.

The TP > 1 case (all-reduces over a real gloo group) is checked against a gathered
log_softmax inside tests/distributed/invariance_worker.py."""

from __future__ import annotations

import torch

from megatron_paced.logprobs import (
    mask_vocab_padding, next_token_log_probs, sequence_log_probs, vocab_parallel_log_probs,
)


def _logits(batch=3, seq=7, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * 3


def test_values_and_gradient_match_log_softmax():
    logits = _logits().requires_grad_(True)
    targets = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    ours = vocab_parallel_log_probs(logits, targets, tp_group=None, vocab_start=0, vocab_size=50)
    reference_logits = logits.detach().clone().requires_grad_(True)
    reference = torch.log_softmax(reference_logits, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    weights = torch.randn(3, 7, dtype=torch.float64)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(logits.grad.double(), reference_logits.grad, rtol=1e-5, atol=1e-6)


def test_padding_rows_take_no_probability_mass():
    logits = _logits(vocab=64)
    logits[..., 50:] = 100.0  # padded rows with huge logits must not matter
    targets = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    ours = vocab_parallel_log_probs(logits, targets, tp_group=None, vocab_start=0, vocab_size=50)
    reference = torch.log_softmax(logits[..., :50], -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    # A shard entirely inside the padding is all -inf.
    assert torch.isinf(mask_vocab_padding(logits[..., 50:], 50, 50)).all()
    assert mask_vocab_padding(logits, 0, 64) is logits  # nothing to mask


def test_next_token_alignment_and_argmax_flags():
    logits = _logits(batch=2, seq=5, vocab=10)
    tokens = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(3))
    tokens[0, 1:] = logits[0, :-1].argmax(-1)  # row 0 follows the greedy path
    log_probs, is_argmax = next_token_log_probs(logits, tokens, tp_group=None, vocab_start=0,
                                                vocab_size=10, return_is_argmax=True)
    assert log_probs.shape == (2, 5) and (log_probs[:, 0] == 0).all()
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(log_probs[:, 1:].double(), expected, rtol=1e-6, atol=1e-6)
    assert is_argmax[0].all()
    torch.testing.assert_close(is_argmax[1, 1:], tokens[1, 1:] == logits[1, :-1].argmax(-1))


def test_sequence_sums_and_means():
    token_log_probs = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(sequence_log_probs(token_log_probs, mask), torch.tensor([-3.0, -0.5]))
    torch.testing.assert_close(sequence_log_probs(token_log_probs, mask, token_mean=True),
                               torch.tensor([-1.5, -0.5]))
