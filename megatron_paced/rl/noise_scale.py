"""The gradient noise scale of the RL loss, measured from the two batch sizes every step
already has: a small batch's gradient (b items; each data-parallel rank's local gradient, or
on one rank the first micro-batch's) and the step's whole mean gradient (B items).
McCandlish et al. 2018 (arXiv 1812.06162), appendix A.1: with G the true gradient
and Sigma the per-item gradient covariance, E |G_b|^2 = |G|^2 + tr(Sigma) / b, so the two
sizes give unbiased estimates of both terms::

    y_small = mean_r |G_{b_r}|^2,  x_small = mean_r 1 / b_r        (the ranks' local gradients)
    y_big   = |G_B|^2,             x_big   = 1 / B                 (the reduced gradient)
    S   = (y_small - y_big) / (x_small - x_big)        estimates tr(Sigma)
    G^2 = y_big - S x_big                              estimates |G|^2
    B_simple = S / G^2                                 the noise scale, in items

Items are what the loss counts (sequences for the PACED and FlowRL losses, completion tokens
for GRPO). On DP > 1 the small batches are the ranks' shares, contiguous slices of the
selected prompts holding whole groups: the figure is then the noise scale of adding prompts
at the step's G samples each (the within-prompt noise counted per item, the between-prompt
noise G times), and a selection order that sorts prompts (the paced rules rank them by
their distance to tau) makes the shares differ by more than chance and inflates tr(Sigma);
it is cleanest under uniform selection. On one DP rank without a pipeline the small batch
is the first micro-batch (``models.policy.LocalGradients``, read from the grad buffers
before the second micro-batch, no extra pass), and the optimization stage shuffles the
step's rows first (seeded by the step), so it is a uniformly random subset of sequences and
the figure is the noise scale per sequence (groups split). (Without the shuffle the first
micro-batch is the first prompts in selection order, and on the CPU benchmark it gave a
negative B_simple on every run.) A step's B_simple is very noisy; :class:`NoiseScale`
averages S and G^2 separately over the steps of an interval (McCandlish's recipe) and
reports their ratio with a delta-method standard error over those steps. Progress per
sample falls once the batch is well above B_simple: 1 / (1 + B_simple / B) of a step's
progress is what a batch of B buys.

Usage::

    noise = NoiseScale()
    noise.add(*noise_scale_terms(local_sq, local_items, policy_step.grad_norm ** 2, total))
    noise.summary()   # {"grad_noise_scale": ..., "grad_noise_scale_se": ..., ...}, then reset
    run_noise_scale(rows)  # (B_simple, B) over a whole metrics.jsonl, or None
"""

from __future__ import annotations

import math

import torch


def noise_scale_terms(small_sq_norms: torch.Tensor, small_items: torch.Tensor,
                      big_sq_norm: float, big_items: float) -> tuple[float, float]:
    """(G^2, S) of one step: each rank's |G_b|^2 and b (R,), the reduced |G_B|^2 and B."""
    x_small = float((1.0 / small_items.double()).mean())
    y_small = float(small_sq_norms.double().mean())
    x_big = 1.0 / float(big_items)
    trace = (y_small - big_sq_norm) / (x_small - x_big)
    return big_sq_norm - trace * x_big, trace


class NoiseScale:
    """(G^2, S) of the steps since the last :meth:`summary`."""

    def __init__(self) -> None:
        self.terms: list[tuple[float, float]] = []
        self.items: list[float] = []

    def add(self, sq_norm: float, trace: float, batch_items: float) -> None:
        self.terms.append((sq_norm, trace))
        self.items.append(batch_items)

    def summary(self) -> dict:
        """``grad_noise_scale`` = mean S / mean G^2 over the steps, its standard error, the
        two terms, the steps and the batch B (mean items per step); then start afresh."""
        if not self.terms:
            return {}
        g2, s = torch.tensor(self.terms, dtype=torch.float64).unbind(1)
        n, mg, ms = len(g2), float(g2.mean()), float(s.mean())
        out = {"grad_noise_scale": ms / mg if mg != 0 else float("nan"),
               "grad_sq_norm": mg, "grad_noise_trace": ms, "grad_noise_steps": n,
               "grad_batch_items": sum(self.items) / n}
        if n > 1 and mg != 0:
            cov = torch.cov(torch.stack([s, g2]))  # delta method for a ratio of means
            var = (float(cov[0, 0]) / mg ** 2 + ms ** 2 * float(cov[1, 1]) / mg ** 4
                   - 2 * ms * float(cov[0, 1]) / mg ** 3) / n
            out["grad_noise_scale_se"] = math.sqrt(max(var, 0.0))
        self.terms, self.items = [], []
        return out

    def state_dict(self) -> dict:
        """The steps not yet logged (a checkpoint's, so a resumed run logs the same)."""
        return {"terms": [list(t) for t in self.terms], "items": list(self.items)}

    def load_state_dict(self, state: dict | None) -> None:
        self.terms = [tuple(t) for t in (state or {}).get("terms", [])]
        self.items = list((state or {}).get("items", []))


def run_noise_scale(rows: list[dict]) -> tuple[float, float] | None:
    """(B_simple, B) of a whole run from its ``metrics.jsonl`` rows: sum of S over sum of G^2
    (each log weighted by its steps) and the mean batch in items; None without a log."""
    logs = [r for r in rows if "grad_noise_scale" in r]
    if not logs:
        return None
    weight = [r["grad_noise_steps"] for r in logs]
    trace = sum(w * r["grad_noise_trace"] for w, r in zip(weight, logs))
    sq_norm = sum(w * r["grad_sq_norm"] for w, r in zip(weight, logs))
    batch = sum(w * r["grad_batch_items"] for w, r in zip(weight, logs)) / sum(weight)
    return (trace / sq_norm if sq_norm != 0 else float("nan")), batch
