"""The calibration probe: how right ``beta * log_z`` is, against many-sample accuracy.

Proposition 4.1 says ``beta * log_z[x]`` converges to the accuracy of x under pi_old (plus
``beta * KL(pi_old || pi_theta)``, small). The per-step ``acc_est_mae`` compares it with one
group of G samples on the *selected* prompts: mostly the group's binomial noise and the
selection, not the estimate. The probe measures the estimate itself. Every
``--calibration-interval`` steps it draws up to ``--calibration-prompts`` prompts uniformly
from the training prompts the table has visited, as many from those it never visited, and
(given ``heldout_problems``, e.g. the eval set) as many prompts held out from training,
samples ``--calibration-samples`` (M) completions of each (not trained on, not counted in
``num_samples``), and compares the clamped estimate e = clamp(beta * log_z, 0, 1) with the
Monte-Carlo accuracy p_hat. A held-out prompt's estimate is the learned head's (``--log-z-param
head|hybrid``), or the table's prior ``--log-z-init-acc`` (the best a table can say). For
each group g in (visited, unvisited, heldout)::

    calib_g_mae             mean |e - p_hat|
    calib_g_noise_var       mean p_hat (1 - p_hat) / (M - 1)   (the probe's own noise: an
                            unbiased estimate of Var(p_hat) per prompt)
    calib_g_rmse_corrected  sqrt(max(0, mean (e - p_hat)^2 - noise_var)): the estimator's
                            RMS error against the true accuracy, the probe's noise removed
    calib_g_acc_std         the spread (std) of p_hat over the probed prompts: about the
                            error of the best constant estimate, the scale to read the
                            others against
    calib_g_num             prompts probed

With ``per_prompt`` (``--log-prompt-accuracy``) it also logs ``calib_g_prompts``: one
``[row, visits, estimate, p_hat]`` per probed prompt, to see which prompts the error comes
from (e.g. rows visited once, early, whose accuracy has moved since).

A perfect estimator still shows calib_g_mae of about 0.07 at p = 0.5 with M = 32; its
corrected RMSE is about 0. A group with no prompt (nothing visited yet, or everything) logs
only its ``calib_g_num`` of 0. The prompts are the same on every rank (a generator seeded by
(seed, step)); each DP rank samples its share.

Usage::

    metrics = calibration_probe(log_z, sample_rewards, problems, num_prompts=16,
                                num_samples=32, seed=seed, step=step, ctx=ctx)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_paced.rl.evaluate import SampleRewards
from megatron_paced.utils import derive_seed

CALIBRATION_STREAM = 91  # derive_seed(seed, step, CALIBRATION_STREAM, i) seeds the probe


def probe_rows(visits: torch.Tensor, num: int, *, seed: int, step: int) -> dict:
    """Up to ``num`` rows drawn uniformly (without replacement) from the visited rows and as
    many from the never-visited ones: {"visited": (n,), "unvisited": (m,)}."""
    gen = torch.Generator().manual_seed(derive_seed(seed, step, CALIBRATION_STREAM, 0))
    order = torch.randperm(len(visits), generator=gen)
    seen = visits[order] > 0
    return {"visited": order[seen][:num], "unvisited": order[~seen][:num]}


def calibration_stats(acc_est: torch.Tensor, p_hat: torch.Tensor, num_samples: int,
                      group: str) -> dict:
    """The figures above for one group: (n,) clamped estimates and (n,) probe accuracies."""
    if len(p_hat) == 0:
        return {f"calib_{group}_num": 0}
    error = acc_est.double() - p_hat.double()
    noise_var = float((p_hat * (1 - p_hat) / max(num_samples - 1, 1)).mean())
    mse = float((error ** 2).mean())
    return {f"calib_{group}_mae": float(error.abs().mean()),
            f"calib_{group}_noise_var": noise_var,
            f"calib_{group}_rmse_corrected": max(0.0, mse - noise_var) ** 0.5,
            f"calib_{group}_acc_std": float(p_hat.double().std(unbiased=False)),
            f"calib_{group}_num": len(p_hat)}


def calibration_probe(log_z, sample_rewards: SampleRewards, problems, *, num_prompts: int,
                      num_samples: int, seed: int, step: int, ctx, heldout_problems=None,
                      per_prompt: bool = False) -> dict:
    """Run the probe (collective over DP; every rank returns the same figures).
    ``sample_rewards(problems, n, seed)`` -> (P, n) rewards; ``problems[row]`` is a row's."""
    visits = log_z.gather_visits()
    groups = probe_rows(visits, num_prompts, seed=seed, step=step)
    estimates = {group: log_z.acc_est(rows) for group, rows in groups.items()}
    sources = {"visited": problems, "unvisited": problems}
    if heldout_problems:
        gen = torch.Generator().manual_seed(derive_seed(seed, step, CALIBRATION_STREAM, 9))
        groups["heldout"] = torch.randperm(len(heldout_problems), generator=gen)[:num_prompts]
        estimates["heldout"] = log_z.heldout_acc_est(groups["heldout"])
        sources["heldout"] = heldout_problems
    out: dict = {}
    for index, (group, rows) in enumerate(groups.items()):
        acc_est = estimates[group].clamp(0.0, 1.0)
        p_hat = torch.zeros(len(rows), dtype=torch.float64)
        mine = torch.arange(len(rows))[ctx.dp_rank::ctx.dp_size]  # may be empty
        if len(mine):
            rewards = sample_rewards([sources[group][int(r)] for r in rows[mine]], num_samples,
                                     derive_seed(seed, step, CALIBRATION_STREAM, index + 1))
            p_hat[mine] = rewards.double().mean(dim=1)
        if ctx.dp_size > 1:
            dist.all_reduce(p_hat, group=ctx.dp_group)  # each row filled by one DP rank
        out.update(calibration_stats(acc_est, p_hat, num_samples, group))
        if per_prompt:
            seen = visits[rows] if group != "heldout" else torch.zeros(len(rows))
            out[f"calib_{group}_prompts"] = [
                [int(r), int(v), round(float(e), 4), round(float(p), 4)]
                for r, v, e, p in zip(rows, seen, acc_est, p_hat)]
    return out
