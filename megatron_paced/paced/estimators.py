"""Accuracy estimators prompt selection can read instead of ``beta * log_z``: a free one that
is not a partition function, and an oracle.

``--acc-estimator`` picks what the selection rule (``--prompt-selection paced-greedy`` or
``paced-soft``: nearest to tau), the replay priority, the logged ``acc_est`` and the
calibration probe read:

* ``log-z`` (default): PACED-RL's ``beta * log_z[x]`` (:mod:`megatron_paced.paced.log_z`).
* ``beta-posterior``: MoPPS's estimate (arXiv 2507.04632): each prompt's success rate has a
  Beta(alpha, beta) posterior, updated from the rewards of every group trained on, with the
  old evidence discounted by lambda (``--beta-posterior-decay``; 1 = no discount)::

      alpha <- lambda alpha + (1 - lambda) a0 + sum_i r_i
      beta  <- lambda beta  + (1 - lambda) a0 + sum_i (1 - r_i)
      acc_est(x) = alpha / (alpha + beta)          (the posterior mean)

  starting from Beta(a0, a0) (``--beta-posterior-prior``). It needs no extra rollouts and
  no loss, so it also selects for GRPO. MoPPS itself picks by a posterior sample (Thompson
  sampling); the posterior mean under PACED's rule is the like-for-like comparison with
  ``beta * log_z``. The table is sharded by prompt row as the log-Z table is
  (:class:`~megatron_paced.paced.sharded_rows.ShardedRows`).
* ``oracle``: the current policy's exact accuracy on each candidate, the upper bound of any
  accuracy-driven selection. For the arithmetic task the answer is one string, so the
  accuracy under sampling at temperature 1 is the probability of the answer followed by the
  end token, ``exp(S_theta(answer <eos> | x))``: one teacher-forced forward pass per
  candidate, no sampling noise; the task's verifier rewards exactly that completion (a pad or
  bos token inside the answer scores 0). Its forward passes are not samples: they are
  neither counted nor trained on.

Usage::

    posterior = BetaPosteriorTable(num_prompts, prior=1.0, decay=1.0, dp_group=ctx.dp_group)
    posterior.observe(rows, rewards)      # (P,) rows, (P, G) rewards of this rank's groups
    posterior.acc_est(rows)               # posterior means, collective
    oracle = OracleAccuracy(task, policy, ctx, max_new_tokens=16)
    oracle.acc_est(rows)                  # exact accuracies, collective over the world
"""

from __future__ import annotations

import torch

from megatron_paced.forward_backward import SequenceBatch
from megatron_paced.paced.features import dp_slice, gather_dp_slices
from megatron_paced.paced.sharded_rows import ShardedRows, UpdatedRows, load_blocks


class BetaPosteriorTable:
    """Per-prompt Beta posteriors of the success rate, this DP rank's block of rows (an
    :class:`~megatron_paced.paced.estimator.AccuracyEstimator`)."""

    name = "beta-posterior"
    scores_change_every_step = False

    def __init__(self, num_prompts: int, *, prior: float = 1.0, decay: float = 1.0,
                 dp_group=None) -> None:
        self.shard = ShardedRows(num_prompts, dp_group)
        self.num_prompts, self.dp_group = num_prompts, dp_group
        self.row_start, self.row_end = self.shard.row_start, self.shard.row_end
        self.prior, self.decay = float(prior), float(decay)
        n = self.shard.num_local
        self.alpha = torch.full((n,), self.prior, dtype=torch.float64)
        self.beta_post = torch.full((n,), self.prior, dtype=torch.float64)
        self.visits = torch.zeros(n, dtype=torch.int64)
        self.updated = UpdatedRows()

    def observe(self, rows: torch.Tensor, rewards: torch.Tensor) -> None:
        """Update the posteriors of this rank's groups (collective over DP): ``rows`` (P,)
        global rows, ``rewards`` (P, G) in [0, 1]."""
        rows = rows.to(torch.int64).cpu()
        rewards = rewards.to(torch.float64).cpu()
        self.shard.check(rows)
        stats = torch.stack([rewards.sum(1), (1 - rewards).sum(1)], dim=1)  # (P, 2)
        route = self.shard.route(rows)
        recv = self.shard.to_owners(route, stats)
        local = route.recv_rows - self.row_start
        touched, inverse = torch.unique(local, return_inverse=True)
        totals = torch.zeros(len(touched), 2, dtype=torch.float64).index_add_(0, inverse, recv)
        keep, fresh = self.decay, (1 - self.decay) * self.prior
        self.alpha[touched] = keep * self.alpha[touched] + fresh + totals[:, 0]
        self.beta_post[touched] = keep * self.beta_post[touched] + fresh + totals[:, 1]
        self.visits[touched] += 1
        self.updated.mark(touched)

    # ---- estimates (what selection reads) -------------------------------------------------
    def local_acc_est(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior means of this rank's rows (all, or the given local indices), float64."""
        alpha = self.alpha if rows is None else self.alpha[rows]
        beta = self.beta_post if rows is None else self.beta_post[rows]
        return alpha / (alpha + beta)

    def acc_est(self, rows: torch.Tensor) -> torch.Tensor:
        """Posterior means of the given global rows, from their owners (collective)."""
        return self.shard.lookup(rows, self.local_acc_est)

    def owned_acc_est(self, rows: torch.Tensor) -> torch.Tensor:
        """Posterior means of global rows this rank owns (no collective)."""
        return self.local_acc_est(rows - self.row_start)

    def heldout_acc_est(self, index: torch.Tensor) -> torch.Tensor:
        """Prompts outside the table: the prior mean."""
        return torch.full((len(index),), 0.5, dtype=torch.float64)

    def gather_acc_est(self) -> torch.Tensor:
        return self.shard.gather(self.local_acc_est())

    def gather_visits(self) -> torch.Tensor:
        return self.shard.gather(self.visits.double()).long()

    def take_updated_rows(self) -> torch.Tensor | None:
        """Local rows written since the last call (None: all of them, e.g. after a load)."""
        return self.updated.take()

    # ---- checkpointing --------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"alpha": self.alpha, "beta_post": self.beta_post, "visits": self.visits}

    def sharded_state_dict(self, prefix: str, replica_id=(0,)) -> dict:
        return self.shard.sharded_state_dict(self.state_tensors(), prefix=prefix,
                                             replica_id=replica_id)

    def load_state_dict(self, state: dict) -> None:
        load_blocks(self.state_tensors(), state)
        self.updated.mark_all()


class OracleAccuracy:
    """The policy's exact accuracy of any prompt of a one-answer task (see the module)."""

    name = "oracle"
    scores_change_every_step = True
    """Selection scores a candidate pool each step (the policy changed)."""

    def __init__(self, task, policy, ctx, *, max_new_tokens: int) -> None:
        self.task, self.policy, self.ctx = task, policy, ctx
        self.max_new_tokens = max_new_tokens
        self.num_prompts = len(task.problems)
        self.row_start, self.row_end = 0, self.num_prompts

    def observe(self, rows: torch.Tensor, rewards: torch.Tensor) -> None:
        """Nothing to learn: the oracle reads the policy."""

    def _answer_batch(self, problems) -> SequenceBatch:
        eos = self.task.stop_token_ids[0]
        sequences, masks = [], []
        for problem in problems:
            prompt = self.task.prompt_tokens(problem)
            answer = self.task.tokenizer.encode(problem.answer)
            target = answer + [eos] if len(answer) < self.max_new_tokens else answer
            sequences.append(prompt + target)
            masks.append([0.0] * len(prompt) + [1.0] * len(target))
        length = max(len(s) for s in sequences)
        tokens = torch.zeros(len(problems), length, dtype=torch.long)
        mask = torch.zeros(len(problems), length)
        for row, (sequence, weights) in enumerate(zip(sequences, masks)):
            tokens[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(weights)] = torch.tensor(weights)
        return SequenceBatch(tokens, mask)

    @torch.no_grad()
    def acc_est(self, rows: torch.Tensor) -> torch.Tensor:
        """(n,) float64 accuracies of the given rows under the current policy, the same on
        every rank (each DP rank scores a share; collective over the world)."""
        rows = rows.to(torch.int64).cpu()
        start, end = dp_slice(len(rows), self.ctx)
        problems = [self.task.problems[int(row)] for row in rows[start:end]]
        local = torch.zeros(0, 1, dtype=torch.float64)
        if problems:
            fits = torch.tensor([len(self.task.tokenizer.encode(p.answer)) <= self.max_new_tokens
                                 for p in problems])
            batch = self._answer_batch(problems)
            log_probs = self.policy.log_probs(batch)
            local = (log_probs.sequence_log_probs.double().cpu().exp() * fits)[:, None]
        return gather_dp_slices(local, len(rows), self.ctx)[:, 0]

    def gather_visits(self) -> torch.Tensor:
        return torch.zeros(self.num_prompts, dtype=torch.int64)

    def heldout_acc_est(self, index: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the oracle estimates training prompts only")

    def sharded_state_dict(self, prefix: str, replica_id=(0,)) -> dict:
        """Nothing to save: the oracle reads the policy."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to load."""
