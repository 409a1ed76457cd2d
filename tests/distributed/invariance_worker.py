"""Worker for the layout-invariance tests: one torchrun launch runs several TP x PP layouts.

For each layout (``TPxPP``, DP fills the rest of the world) and each model family it builds
the policy from the same seed, then records, on global rank 0, as full (TP1, PP1) tensors:

* ``log_probs``: (B, T) token log-probs of a fixed global batch (no grad);
* ``params_init``: the initial parameters;
* ``params_sgd``: the parameters after one SGD step (lr 1, clipped at norm 1) of the NLL loss;
* ``params_adam``: the parameters after two AdamW steps (the second depends on gradient ratios);
* ``grad_norms``: the global grad norms the optimizer reported.

The test process compares every layout with the single-process one. In-worker checks (vocab
parallel log-probs against a gathered ``log_softmax``, PP broadcast) go to ``checks.json``.

    torchrun --nproc-per-node 4 -m tests.distributed.invariance_worker --out DIR \
        --layouts 2x2 2x1 1x2 1x1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_paced.config import OptimizerConfig, ParallelConfig
from megatron_paced.forward_backward import SequenceBatch, compute_log_probs, forward_backward
import functools

from megatron_paced.losses import (
    flowrl_loss_fn, group_normalized_advantages, grpo_loss_fn, nll_loss, paced_loss_fn,
)
from megatron_paced.models.config import PRESETS, ModelConfig
from megatron_paced.models.policy import build_policy, build_reference, local_grad_sq_norm
from megatron_paced.models.sharding import gather_full_state_dict, unwrap_model
from megatron_paced.rl.batch import RLBatch
from megatron_paced.parallel import (
    ParallelContext, broadcast_from_last_stage, destroy_parallel, initialize_parallel,
)
from megatron_paced.testing.distributed import CheckRecorder

FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-qwen3")
GLOBAL_BATCH = 8
SEQ_LENGTH = 24
MICRO_BATCH = 2
SEED = 1234


def make_global_batch(vocab_size: int) -> SequenceBatch:
    """A fixed batch: random prompts of 4-10 tokens, completions of 3-12, right-padded."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LENGTH), generator=gen)
    mask = torch.zeros(GLOBAL_BATCH, SEQ_LENGTH)
    for row in range(GLOBAL_BATCH):
        prompt = int(torch.randint(4, 11, (), generator=gen))
        completion = int(torch.randint(3, 13, (), generator=gen))
        end = min(prompt + completion, SEQ_LENGTH)
        mask[row, prompt:end] = 1.0
        tokens[row, end:] = 0  # padding
    return SequenceBatch(tokens, mask)


def gather_over_dp(local: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(ctx.dp_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.dp_group)
    return torch.cat(parts)


def full_params(policy, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    return gather_full_state_dict(policy.modules()[0], ctx.tp_group, ctx.pp_group)


def train_steps(policy, batch: SequenceBatch, ctx, model_cfg: ModelConfig, num_steps: int):
    grad_norms = []
    for _ in range(num_steps):
        policy.zero_grad()
        forward_backward(policy.model, batch, nll_loss, ctx, vocab_size=model_cfg.vocab_size,
                         micro_batch_size=MICRO_BATCH)
        grad_norms.append(policy.step().grad_norm)
    return grad_norms


def check_log_probs_against_log_softmax(checks, policy, batch, ctx, model_cfg, name):
    """On the last stage: our vocab-parallel log-probs == log_softmax of gathered logits."""
    if not ctx.is_last_stage or ctx.pp_size > 1:
        return  # needs the whole model on this rank to run a plain forward
    with checks.check(f"vocab_parallel_log_probs_equal_log_softmax[{name}]"):
        gpt = policy.modules()[0]
        with torch.no_grad():
            tokens = batch.tokens
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            logits = gpt(tokens, positions, None)  # (b, T, V/tp)
            shards = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
            dist.all_gather(shards, logits.contiguous(), group=ctx.tp_group)
            full = torch.cat(shards, dim=-1)[..., : model_cfg.vocab_size]
            expected = torch.log_softmax(full.double(), dim=-1)[:, :-1].gather(
                -1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            expected = torch.nn.functional.pad(expected, (1, 0)) * batch.completion_mask
        ours = compute_log_probs(policy.model, batch, ctx, vocab_size=model_cfg.vocab_size,
                                 micro_batch_size=MICRO_BATCH).token_log_probs
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=5e-6)


def check_reference(checks, policy, model_cfg, batch, policy_log_probs, ctx, layout) -> None:
    """The reference copies the trained policy's weights shard for shard, is frozen, and
    survives park/unpark; its log-probs equal the policy's at the copy, then stay put."""
    with checks.check(f"reference_is_a_frozen_copy[{layout}]"):
        reference = build_reference(model_cfg, ctx, seed=SEED + 1, copy_from=policy)
        assert all(not p.requires_grad for p in reference.model[0].parameters())
        reference.park()
        reference.unpark()
        ours = compute_log_probs(reference.model, batch, ctx, vocab_size=model_cfg.vocab_size,
                                 micro_batch_size=MICRO_BATCH)
        current = compute_log_probs(policy.model, batch, ctx, vocab_size=model_cfg.vocab_size,
                                    micro_batch_size=MICRO_BATCH)
        torch.testing.assert_close(ours.token_log_probs, current.token_log_probs, rtol=0, atol=0)
        # The policy was trained one step since policy_log_probs, so they differ now.
        assert not torch.allclose(current.token_log_probs, policy_log_probs.token_log_probs)


def check_engine(checks, policy, model_cfg, ctx, layout) -> None:
    """Embedded engine: sampled tokens' log-probs == the trainer's log-probs of the same
    tokens (1e-5); greedy decoding picks argmax tokens; TP ranks agree on the samples."""
    if ctx.pp_size > 1:
        return
    from megatron_paced.rollout.engine import (
        EmbeddedEngine, SamplingParams, completions_to_batch,
    )

    with checks.check(f"engine_log_probs_equal_trainer[{layout}]"):
        engine = EmbeddedEngine(policy.model, ctx, vocab_size=model_cfg.vocab_size,
                                max_sequence_length=SEQ_LENGTH, max_batch_size=5)
        prompts = [[3, 14, 15, 92], [6, 53], [58, 97, 93, 23, 84, 62], [64]]
        for sampling in (SamplingParams(temperature=1.0, max_new_tokens=9, stop_token_ids=[7]),
                         SamplingParams(temperature=0.0, max_new_tokens=6),
                         SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=5)):
            out = engine.generate(prompts, n=3, sampling=sampling, seed=5 + ctx.dp_rank)
            batch = completions_to_batch(prompts, out, SEQ_LENGTH)
            for c in (c for row in out for c in row):
                assert c.finish_reason in ("stop", "length") and len(c.token_ids) >= 1
                assert len(c.log_probs) == len(c.token_ids)
            trainer = compute_log_probs(policy.model, batch, ctx, vocab_size=model_cfg.vocab_size,
                                        micro_batch_size=batch.num_sequences)
            mask = batch.completion_mask.bool()
            torch.testing.assert_close(trainer.token_log_probs[mask],
                                       batch.rollout_log_probs[mask],
                                       rtol=1e-5, atol=1e-5)
            if sampling.temperature == 0:
                assert trainer.is_argmax[mask].all()
            gathered = [torch.empty_like(batch.tokens) for _ in range(ctx.tp_size)]
            dist.all_gather(gathered, batch.tokens, group=ctx.tp_group)
            assert all(torch.equal(g, batch.tokens) for g in gathered)
            if sampling.temperature == 1.0:
                assert len({tuple(c.token_ids) for c in out[0]}) > 1  # n samples differ


RL_LOSSES = {
    "paced": functools.partial(paced_loss_fn, beta=0.05),
    "flowrl": functools.partial(flowrl_loss_fn, weight_max=1.5),
    "flowrl-proj-z": functools.partial(flowrl_loss_fn, weight_max=1.5),  # log Z from ProjZ
    "grpo": functools.partial(grpo_loss_fn, kl_coef=0.05),
}


def rl_batch(global_batch: SequenceBatch, base_log_probs: torch.Tensor) -> RLBatch:
    """The global batch with fixed rewards, group ids, old/ref log-probs (perturbed from the
    policy's own) and log-Z values."""
    gen = torch.Generator().manual_seed(99)
    mask = global_batch.completion_mask
    rewards = (torch.rand(GLOBAL_BATCH, generator=gen) < 0.5).float()
    groups = torch.arange(GLOBAL_BATCH) // 4
    return RLBatch(
        global_batch.tokens, mask, log_z_rows=torch.arange(GLOBAL_BATCH),
        updates_log_z=torch.ones(GLOBAL_BATCH, dtype=torch.bool), rewards=rewards,
        advantages=group_normalized_advantages(rewards, groups),
        old_log_probs=(base_log_probs + 0.05 * torch.randn(base_log_probs.shape,
                                                           generator=gen)) * mask,
        ref_log_probs=(base_log_probs + 0.1 * torch.randn(base_log_probs.shape,
                                                          generator=gen)) * mask,
        log_z=8.0 + torch.randn(GLOBAL_BATCH, generator=gen))


def rl_step(algo: str, model_cfg, ctx, global_batch, base_log_probs) -> dict:
    """One SGD step of an RL loss; returns the full params and the log-Z gradients (and for
    FlowRL's ProjZ head, whose log Z replaces the batch's, the full params before the step;
    its replicated copies must stay equal over TP)."""
    policy = build_policy(model_cfg, OptimizerConfig(optimizer="sgd", lr=1.0, weight_decay=0.0,
                                                     clip_grad=1.0,
                                                     use_distributed_optimizer=False),
                          ctx, seed=SEED, proj_z_layers=3 if algo == "flowrl-proj-z" else 0,
                          micro_batch_size=MICRO_BATCH, record_local_gradients=algo == "paced")
    before = full_params(policy, ctx) if algo == "flowrl-proj-z" else {}
    shard_sq = {}  # one process: the local gradients DP 2 and 4 ranks would have
    if ctx.world_size == 1 and algo == "paced":
        def mean_grad_sq(rows: RLBatch) -> float:  # finalize divides by the rows' items
            policy.zero_grad()
            forward_backward(policy.model, dataclasses.replace(
                rows, log_z=rows.log_z.clone().requires_grad_(True)), RL_LOSSES[algo],
                ctx, vocab_size=model_cfg.vocab_size, micro_batch_size=MICRO_BATCH)
            return local_grad_sq_norm(policy.model, ctx)

        whole = rl_batch(global_batch, base_log_probs)
        shard_sq = {dp: [mean_grad_sq(whole.shard_for_dp(rank, dp)) for rank in range(dp)]
                    for dp in (2, 4)}
        shard_sq["first_micro_batch"] = mean_grad_sq(whole.rows(0, MICRO_BATCH))
    batch = rl_batch(global_batch, base_log_probs).shard_for_dp(ctx.dp_rank, ctx.dp_size)
    log_z = batch.log_z.clone().requires_grad_(True)
    batch = dataclasses.replace(batch, log_z=log_z)
    policy.zero_grad()
    policy.forward_backward(batch, RL_LOSSES[algo])
    local = torch.tensor([policy.local_gradients.sq_norm], dtype=torch.float64)
    grad_norm = policy.step().grad_norm
    log_z_grad = log_z.grad if log_z.grad is not None else torch.zeros_like(log_z)
    log_z_grad = broadcast_from_last_stage(log_z_grad.detach().clone(), ctx)
    for name, param in unwrap_model(policy.model[-1]).named_parameters():
        if name.startswith("proj_z.") and ctx.tp_size > 1:
            copies = [torch.empty_like(param) for _ in range(ctx.tp_size)]
            dist.all_gather(copies, param.detach().contiguous(), group=ctx.tp_group)
            assert all(torch.equal(copy, copies[0]) for copy in copies), name
    return {"params": full_params(policy, ctx), "log_z_grad": gather_over_dp(log_z_grad, ctx),
            "grad_norm": grad_norm, "params_before": before,
            "local_sq": gather_over_dp(local, ctx), "shard_sq": shard_sq}


def rl_mini_steps(algo: str, model_cfg, ctx, global_batch, base_log_probs) -> dict:
    """--num-steps-per-rollout 2: the batch's two mini-batches (rl.batch.split_for_steps, each
    row its own group here), one SGD step each against the same old log-probs; the second
    step's policy has moved from them (GRPO's ratio is clipped there). Returns the full
    params after both and the two grad norms."""
    from megatron_paced.rl.batch import split_for_steps

    policy = build_policy(model_cfg, OptimizerConfig(optimizer="sgd", lr=1.0, weight_decay=0.0,
                                                     clip_grad=1.0,
                                                     use_distributed_optimizer=False),
                          ctx, seed=SEED, micro_batch_size=MICRO_BATCH)
    batch = rl_batch(global_batch, base_log_probs).shard_for_dp(ctx.dp_rank, ctx.dp_size)
    grad_norms = []
    for mini in split_for_steps(batch, 2, num_fresh=batch.num_sequences, group_size=1):
        policy.zero_grad()
        policy.forward_backward(dataclasses.replace(
            mini, log_z=mini.log_z.clone().requires_grad_(True)), RL_LOSSES[algo])
        grad_norms.append(policy.step().grad_norm)
    return {"params": full_params(policy, ctx), "grad_norms": grad_norms}


def prompt_feature_record(checks: CheckRecorder, policy, batch: SequenceBatch, log_probs,
                          ctx: ParallelContext, name: str) -> dict:
    """Features of the batch's prompts (mean and last-token pooling of the final-norm hidden
    states), this DP rank's share gathered, and a log-Z head's outputs on them; on a
    one-stage layout, the output layer applied to the last prompt token's feature must give
    the log-prob of the first completion token."""
    from megatron_paced.paced.features import project, prompt_features, standardize
    from megatron_paced.paced.head import LogZHead

    starts = batch.completion_mask.argmax(dim=1).tolist()  # the prompt ends where it starts
    prompts = [batch.tokens[row, :start].tolist() for row, start in enumerate(starts)]
    out = {}
    for pooling in ("mean", "last"):
        features = prompt_features(policy.model, prompts, ctx, micro_batch_size=MICRO_BATCH,
                                   pooling=pooling)
        out[f"features_{pooling}"] = gather_over_dp(features, ctx)
        # What the learned log-Z head makes of them (projected, standardized, one step taken).
        inputs = standardize(project(out[f"features_{pooling}"], 16, seed=3), None)[0]
        head = LogZHead(16, width=16, beta=0.05, init_acc=0.5, lr=0.1, seed=3)
        head.step(inputs, torch.linspace(-1.0, 1.0, len(inputs), dtype=torch.float64))
        out[f"log_z_head_{pooling}"] = head(inputs).detach() - 0.5 / 0.05  # from tau / beta
    if ctx.pp_size == 1:
        with checks.check(f"last_prompt_feature_predicts_the_next_token[{name}]"):
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            model = unwrap_model(policy.model[0])
            weight = (model.shared_embedding_or_output_weight()
                      if model.share_embeddings_and_output_weights else None)
            hidden = features.to(ctx.device)[None].to(model.output_layer.weight.dtype
                                                         if weight is None else weight.dtype)
            with torch.no_grad():
                logits, _ = model.output_layer(hidden, weight=weight)
                logits = gather_from_tensor_model_parallel_region(logits, group=ctx.tp_group)
            next_tokens = batch.tokens[torch.arange(len(starts)), starts]
            expected = log_probs.token_log_probs[torch.arange(len(starts)), starts]
            got = torch.log_softmax(logits[0].float().cpu(), -1)[torch.arange(len(starts)),
                                                                  next_tokens]
            torch.testing.assert_close(got, expected.cpu(), rtol=1e-4, atol=1e-4)
    return out


def check_feature_cache(checks: CheckRecorder, policy, global_batch: SequenceBatch,
                        ctx: ParallelContext, cache: Path, name: str) -> None:
    """--log-z-feature-cache: the first layout to run writes the features of the batch's
    prompts (and 5 held-out ones) sharded by row; every later layout, on its own row blocks
    (another DP size), reads them back equal to what it computes itself; the digest of the
    prompts is the same on every DP size."""
    from megatron_paced.paced.features import dp_slice, log_z_features, sharded_prompts_digest

    starts = global_batch.completion_mask.argmax(dim=1).tolist()
    prompts = [global_batch.tokens[row, :start].tolist() for row, start in enumerate(starts)]
    heldout = [prompt[::-1] for prompt in prompts[:5]]
    row_start, row_end = dp_slice(len(prompts), ctx)

    def features(cache_dir):
        return log_z_features(policy.model, lambda start, end: prompts[start:end], heldout, ctx,
                              row_start=row_start, row_end=row_end, num_prompts=len(prompts),
                              dim=8, pooling="mean", micro_batch_size=MICRO_BATCH, seed=3,
                              cache_dir=cache_dir)

    with checks.check(f"feature_cache_reads_what_is_computed[{name}]"):
        digest = sharded_prompts_digest(lambda start, end: prompts[start:end], row_start,
                                        row_end, ctx.dp_group)
        assert digest == sharded_prompts_digest(lambda start, end: prompts[start:end], 0,
                                                len(prompts), None)
        local, held = features(None)
        cached_local, cached_held = features(str(cache / digest))
        assert cached_local.shape == (row_end - row_start, 8) and cached_held.shape == (5, 8)
        torch.testing.assert_close(cached_local, local, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cached_held, held, rtol=1e-4, atol=1e-4)


def run_layout(tp: int, pp: int, out: Path, checks: CheckRecorder) -> None:
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    ctx = initialize_parallel(parallel, seed=SEED)
    layout = f"tp{tp}pp{pp}dp{ctx.dp_size}"
    for family in FAMILIES:
        model_cfg = PRESETS[family]
        global_batch = make_global_batch(model_cfg.vocab_size)
        batch = global_batch.shard_for_dp(ctx.dp_rank, ctx.dp_size)
        record: dict[str, object] = {}

        sgd = build_policy(model_cfg, OptimizerConfig(optimizer="sgd", lr=1.0, weight_decay=0.0,
                                                      clip_grad=1.0,
                                                      use_distributed_optimizer=False),
                           ctx, seed=SEED)
        log_probs = compute_log_probs(sgd.model, batch, ctx, vocab_size=model_cfg.vocab_size,
                                      micro_batch_size=MICRO_BATCH)
        with checks.check(f"log_probs_on_every_stage[{layout},{family}]"):
            # Every PP stage received the same values from the last stage.
            reference = log_probs.token_log_probs.clone()
            dist.broadcast(reference, src=ctx.last_stage_global_rank(), group=ctx.pp_group)
            torch.testing.assert_close(log_probs.token_log_probs, reference, rtol=0, atol=0)
            assert torch.isfinite(log_probs.sequence_log_probs).all()
        check_log_probs_against_log_softmax(checks, sgd, batch, ctx, model_cfg,
                                            f"{layout},{family}")
        record["log_probs"] = gather_over_dp(log_probs.token_log_probs, ctx)
        record.update(prompt_feature_record(checks, sgd, batch, log_probs, ctx,
                                            f"{layout},{family}"))
        record["params_init"] = full_params(sgd, ctx)
        record["grad_norms_sgd"] = train_steps(sgd, batch, ctx, model_cfg, num_steps=1)
        record["params_sgd"] = full_params(sgd, ctx)

        if family == FAMILIES[0]:
            check_feature_cache(checks, sgd, global_batch, ctx, out / "feature_cache",
                                f"{layout},{family}")
            check_reference(checks, sgd, model_cfg, batch, log_probs, ctx, layout)
            check_engine(checks, sgd, model_cfg, ctx, layout)
            for algo in RL_LOSSES:
                record[f"rl_{algo}"] = rl_step(algo, model_cfg, ctx, global_batch,
                                               record["log_probs"])
            for algo in ("paced", "grpo"):
                record[f"rl_{algo}_mini_steps"] = rl_mini_steps(algo, model_cfg, ctx,
                                                                global_batch, record["log_probs"])

        adam = build_policy(model_cfg, OptimizerConfig(optimizer="adam", lr=1e-3,
                                                       weight_decay=0.1), ctx, seed=SEED)
        record["grad_norms_adam"] = train_steps(adam, batch, ctx, model_cfg, num_steps=2)
        record["params_adam"] = full_params(adam, ctx)
        if dist.get_rank() == 0:
            torch.save(record, out / f"{layout}__{family}.pt")
        del sgd, adam
    destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layouts", nargs="+", required=True, help="TPxPP, e.g. 2x1")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    checks = CheckRecorder()
    for layout in args.layouts:
        tp, pp = (int(x) for x in layout.split("x"))
        run_layout(tp, pp, args.out, checks)
    checks.write(args.out / f"checks_world{os.environ.get('WORLD_SIZE', '1')}.json")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
