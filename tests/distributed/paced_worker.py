"""Worker: sharded log-Z, selection and replay on DP 4, 2, 1 equal the single-process result,
and their checkpoints re-partition across DP sizes.

One torchrun launch of 4 ranks re-initializes Megatron's groups with TP 1, 2, 4, 1 (so DP is
4, 2, 1, 4; TP peers hold replicas). In every layout each rank runs a fixed stream of
operations -- lookups and gradient steps of a global batch split over DP, selections, replay
adds and draws -- on the sharded objects, and the same stream on single-process references
(``dp_group=None``), and checks that they agree. Checkpoints: the DP4 layout saves, the DP2
layout loads it and saves again, DP1 loads that, and DP4 loads the DP2 checkpoint.

    torchrun --nproc-per-node 4 -m tests.distributed.paced_worker --out DIR
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_paced.config import ParallelConfig
from megatron_paced.paced.estimators import BetaPosteriorTable
from megatron_paced.paced.learned_log_z import LearnedLogZ
from megatron_paced.paced.log_z import ShardedLogZ
from megatron_paced.paced.replay import DistributedReplay, ReplayConfig, ReplaySample
from megatron_paced.paced.selection import PromptSelector, SelectionConfig
from megatron_paced.paced.sharded_rows import load_blocks
from megatron_paced.paced.state import load_paced_state, paced_sharded_state_dict
from megatron_paced.parallel import destroy_parallel, initialize_parallel
from megatron_paced.testing.distributed import CheckRecorder

NUM_PROMPTS = 1001  # uneven blocks on DP 2 and 4
BATCH = 24  # samples per step (divisible by DP 1, 2, 4)
STEPS = 30
SEED = 11


def global_stream(step: int):
    """The step's global batch: prompt ids (with repeats), gradients, rewards."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, NUM_PROMPTS, (BATCH // 4,), generator=gen).repeat_interleave(4)
    grads = torch.randn(BATCH, generator=gen, dtype=torch.float64) * 3
    rewards = (torch.rand(BATCH, generator=gen) < 0.5).float()
    return ids, grads, rewards


def make_samples(ids, rewards, step):
    return [ReplaySample(int(pid), torch.full((6,), int(pid)), torch.ones(6),
                         torch.full((6,), -float(step)), float(r), step)
            for pid, r in zip(ids.tolist(), rewards.tolist())]


def tables(dp_group, optimizer):
    kwargs = dict(beta=0.05, init_acc=0.5, lr=0.3, optimizer=optimizer)
    return ShardedLogZ(NUM_PROMPTS, dp_group=dp_group, **kwargs), ShardedLogZ(NUM_PROMPTS, **kwargs)


FEATURE_DIM = 8
LEARNED_STEPS = 12


def learned_tables(dp_group, param="hybrid"):
    """A learned log Z on DP and its single-process reference, with the same features."""
    features = torch.randn(NUM_PROMPTS, FEATURE_DIM, generator=torch.Generator().manual_seed(5))
    heldout = torch.randn(16, FEATURE_DIM, generator=torch.Generator().manual_seed(6))
    kwargs = dict(param=param, feature_dim=FEATURE_DIM, width=16, beta=0.05, init_acc=0.5,
                  lr=0.3, optimizer="running-mean", head_lr=3e-2, fit_rows=32, seed=SEED)
    sharded = LearnedLogZ(NUM_PROMPTS, dp_group=dp_group, **kwargs)
    reference = LearnedLogZ(NUM_PROMPTS, **kwargs)
    sharded.set_features(features[sharded.row_start:sharded.row_end], heldout)
    reference.set_features(features, heldout)
    return sharded, reference


def check_learned(name: str, ctx, checks: CheckRecorder, mine: slice) -> LearnedLogZ:
    """Lookups, updates, head outputs and candidate selections of a hybrid log Z on DP equal
    the single-process ones."""
    sharded, reference = learned_tables(ctx.dp_group)
    with checks.check(f"learned_log_z_equal_single_process[{name}]"):
        for step in range(LEARNED_STEPS):
            ids, grads, _ = global_stream(step)
            torch.testing.assert_close(sharded.lookup(ids[mine]), reference.lookup(ids)[mine],
                                       rtol=1e-6, atol=0)
            sharded.apply_gradients(ids[mine], grads[mine])
            reference.apply_gradients(ids, grads)
        torch.testing.assert_close(sharded.gather_acc_est(), reference.gather_acc_est(),
                                   rtol=1e-9, atol=1e-12)
        for mine_p, ref_p in zip(sharded.head.parameters(), reference.head.parameters()):
            torch.testing.assert_close(mine_p, ref_p, rtol=1e-9, atol=1e-12)
            assert same_everywhere(mine_p.detach().clone())
        index = torch.arange(16)
        torch.testing.assert_close(sharded.heldout_acc_est(index),
                                   reference.heldout_acc_est(index), rtol=1e-9, atol=1e-12)
        # The head was fitted (its last layer starts at zero) and moved every estimate.
        assert float(reference.head.mlp[-1].weight.abs().max()) > 0
        assert float((reference.heldout_acc_est(index) - 0.5).abs().min()) > 0
    with checks.check(f"learned_selection_equal_single_process[{name}]"):
        for rule in ("paced-greedy", "paced-soft"):
            cfg = SelectionConfig(prompt_selection=rule, selection_epsilon=0.2,
                                  selection_candidates=200)
            dist_selector = PromptSelector(cfg, seed=SEED, dp_group=ctx.dp_group)
            ref_selector = PromptSelector(cfg, seed=SEED)
            for step in range(3):
                chosen = dist_selector.select(sharded, 32, step)
                expected = ref_selector.select(reference, 32, step)
                assert torch.equal(chosen, expected), (rule, step, chosen, expected)
                assert same_everywhere(chosen) and len(set(chosen.tolist())) == 32
    return sharded


def check_posterior(name: str, ctx, checks: CheckRecorder, mine: slice) -> BetaPosteriorTable:
    """MoPPS's Beta posterior on DP (its rewards routed to the rows' owners) equals the
    single-process one: estimates, visits and the selections read from it."""
    kwargs = dict(prior=2.0, decay=0.9)
    sharded = BetaPosteriorTable(NUM_PROMPTS, dp_group=ctx.dp_group, **kwargs)
    reference = BetaPosteriorTable(NUM_PROMPTS, **kwargs)
    with checks.check(f"beta_posterior_equal_single_process[{name}]"):
        for step in range(STEPS):
            ids, _, rewards = global_stream(step)
            groups = rewards.reshape(-1, 2)  # groups of 2 samples of the same prompt
            rows = ids[::2]
            mine_groups = slice(mine.start // 2, mine.stop // 2)
            torch.testing.assert_close(sharded.acc_est(rows[mine_groups]),
                                       reference.acc_est(rows)[mine_groups], rtol=0, atol=0)
            sharded.observe(rows[mine_groups], groups[mine_groups])
            reference.observe(rows, groups)
        torch.testing.assert_close(sharded.gather_acc_est(), reference.gather_acc_est(),
                                   rtol=0, atol=0)
        assert torch.equal(sharded.gather_visits(), reference.gather_visits())
        assert int((reference.gather_visits() > 0).sum()) > 100
        cfg = SelectionConfig(prompt_selection="paced-greedy", selection_epsilon=0.2)
        for gather_max in (100_000, 0):  # the gathered table and the candidates' path
            dist_cfg = dataclasses.replace(cfg, selection_gather_max=gather_max)
            dist_selector = PromptSelector(dist_cfg, seed=SEED, dp_group=ctx.dp_group)
            ref_selector = PromptSelector(cfg, seed=SEED)
            for step in range(3):
                chosen = dist_selector.select(sharded, 32, step)
                assert torch.equal(chosen, ref_selector.select(reference, 32, step)), step
                assert same_everywhere(chosen)
    return reference


def same_everywhere(tensor: torch.Tensor) -> bool:
    reference = tensor.clone()
    dist.broadcast(reference, src=0)
    return torch.equal(reference, tensor)


def run_layout(tp: int, out: Path, checks: CheckRecorder, load_from: str | None,
               save_to: str | None) -> None:
    ctx = initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp), seed=SEED)
    name = f"dp{ctx.dp_size}"
    dp_rank, dp_size = ctx.dp_rank, ctx.dp_size
    replay_cfg = ReplayConfig(replay_size=40, replay_per_step=8, replay_successful_only=False)
    greedy = SelectionConfig(prompt_selection="paced-greedy", selection_epsilon=0.2)
    replay = DistributedReplay(replay_cfg, num_prompts=NUM_PROMPTS, seed=SEED,
                               dp_group=ctx.dp_group)
    replay_ref = DistributedReplay(replay_cfg, num_prompts=NUM_PROMPTS, seed=SEED)
    per_rank = BATCH // dp_size
    mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    for optimizer in ("sgd", "adam"):
        sharded, reference = tables(ctx.dp_group, optimizer)
        selectors = {
            "gather": (PromptSelector(greedy, seed=SEED, dp_group=ctx.dp_group),
                       PromptSelector(greedy, seed=SEED)),
            "candidates": (PromptSelector(SelectionConfig(selection_epsilon=0.2,
                                                          selection_gather_max=0),
                                          seed=SEED, dp_group=ctx.dp_group),
                           PromptSelector(greedy, seed=SEED)),
        }
        with checks.check(f"log_z_lookup_and_update_equal_single_process[{name},{optimizer}]"):
            for step in range(STEPS):
                ids, grads, rewards = global_stream(step)
                torch.testing.assert_close(sharded.lookup(ids[mine]), reference.lookup(ids)[mine],
                                           rtol=0, atol=0)
                sharded.apply_gradients(ids[mine], grads[mine])
                reference.apply_gradients(ids, grads)
            torch.testing.assert_close(sharded.gather_acc_est(), reference.gather_acc_est(),
                                       rtol=1e-12, atol=1e-12)
            assert int((reference.visits > 0).sum()) > 100
        with checks.check(f"selection_equal_single_process[{name},{optimizer}]"):
            for path, (dist_selector, ref_selector) in selectors.items():
                for step in range(5):
                    chosen = dist_selector.select(sharded, 32, step)
                    expected = ref_selector.select(reference, 32, step)
                    assert torch.equal(chosen, expected), (path, step, chosen, expected)
                    assert same_everywhere(chosen)
                    assert len(set(chosen.tolist())) == 32
    learned = check_learned(name, ctx, checks, mine)
    posterior = check_posterior(name, ctx, checks, mine)
    # The Adam table (non-trivial optimizer state) goes into the checkpoint below.
    with checks.check(f"replay_equal_single_process[{name}]"):
        for step in range(STEPS):
            ids, grads, rewards = global_stream(step)
            samples = make_samples(ids, rewards, step)
            priorities = grads.abs() / 10
            replay.add(samples[mine], priorities[mine])
            replay_ref.add(samples, priorities)
            drawn, expected = replay.sample(step), replay_ref.sample(step)
            assert [s.order_key() for s in drawn] == [s.order_key() for s in expected]
        state, ref_state = replay.state_dict(), replay_ref.state_dict()
        assert [(i["row"], i["insertion"], i["priority"]) for i in state["items"]] == \
            [(i["row"], i["insertion"], i["priority"]) for i in ref_state["items"]]
        assert len(state["items"]) == 40
    with checks.check(f"replay_draws_follow_priorities[{name}]"):
        counts = collections.Counter()
        num_draws = 0
        for step in range(STEPS, STEPS + 40):
            for sample in replay.sample(step, num=200):
                counts[sample.order_key()] += 1
                num_draws += 1
        items = replay_ref.items
        total = sum(s.priority for s in items)
        chi2 = sum((counts[s.order_key()] - num_draws * s.priority / total) ** 2
                   / (num_draws * s.priority / total) for s in items if s.priority > 0)
        # 39 degrees of freedom: the 0.999 quantile is 72.1.
        assert chi2 < 72.1, chi2
    replica_id = (ctx.tp_rank,)
    if load_from is not None:
        with checks.check(f"checkpoint_reshards[{load_from}->{name}]"):
            from megatron.core import dist_checkpointing

            fresh, _ = tables(ctx.dp_group, "adam")
            fresh_replay = DistributedReplay(replay_cfg, num_prompts=NUM_PROMPTS, seed=SEED,
                                             dp_group=ctx.dp_group)
            fresh_selector = selectors["gather"][0]
            template = paced_sharded_state_dict(fresh, fresh_selector, fresh_replay,
                                                replica_id=replica_id)
            loaded = dist_checkpointing.load(template, str(out / load_from))
            load_paced_state(loaded, fresh, fresh_selector, fresh_replay)
            saved = torch.load(out / f"{load_from}.expected.pt", weights_only=False)
            torch.testing.assert_close(fresh.gather_acc_est(), saved["acc_est"], rtol=0, atol=0)
            for field in ("values", "visits", "exp_avg", "exp_avg_sq"):
                full = torch.zeros(NUM_PROMPTS, dtype=getattr(fresh, field).dtype)
                full[fresh.row_start:fresh.row_end] = getattr(fresh, field)
                dist.all_reduce(full, group=ctx.dp_group)
                torch.testing.assert_close(full, saved[field], rtol=0, atol=0)
                assert bool((full != 0).any()), field  # Adam state really was saved
            got = fresh_replay.state_dict()["items"]
            assert [(i["row"], i["insertion"]) for i in got] == saved["replay"]
            assert all(fresh_replay.partition.owner_of(i["row"]) == dp_rank
                       for i in [vars(s) for s in fresh_replay.items])
        with checks.check(f"learned_checkpoint_reshards[{load_from}->{name}]"):
            fresh, _ = learned_tables(ctx.dp_group)
            fresh.features.zero_()  # the features must come from the checkpoint
            template = paced_sharded_state_dict(fresh, fresh_selector, fresh_replay,
                                                replica_id=replica_id)
            loaded = dist_checkpointing.load(template, str(out / f"learned_{load_from}"))
            load_paced_state(loaded, fresh, fresh_selector, fresh_replay)
            # The same weights and features; float64 sums of another batch split: 1 ulp.
            torch.testing.assert_close(fresh.gather_acc_est(), saved["learned_acc_est"],
                                       rtol=0, atol=1e-12)
            for param, saved_param in zip(fresh.head.parameters(), saved["head"]):
                torch.testing.assert_close(param.detach(), saved_param, rtol=0, atol=0)
            torch.testing.assert_close(fresh.head.optimizer.state_dict()["state"][0]["exp_avg"],
                                       saved["head_exp_avg"], rtol=0, atol=0)
        with checks.check(f"beta_posterior_checkpoint_reshards[{load_from}->{name}]"):
            fresh_posterior = BetaPosteriorTable(NUM_PROMPTS, prior=2.0, decay=0.9,
                                                 dp_group=ctx.dp_group)
            table, _ = tables(ctx.dp_group, "adam")
            template = paced_sharded_state_dict(table, fresh_selector, fresh_replay,
                                                replica_id=replica_id, estimator=fresh_posterior)
            loaded = dist_checkpointing.load(template, str(out / f"posterior_{load_from}"))
            load_paced_state(loaded, table, fresh_selector, fresh_replay, fresh_posterior)
            torch.testing.assert_close(fresh_posterior.gather_acc_est(),
                                       saved["posterior_acc_est"], rtol=0, atol=0)
            assert torch.equal(fresh_posterior.gather_visits(), saved["posterior_visits"])
        with checks.check(f"table_checkpoint_loads_as_hybrid[{load_from}->{name}]"):
            hybrid, _ = learned_tables(ctx.dp_group)
            template = paced_sharded_state_dict(hybrid, fresh_selector, fresh_replay,
                                                replica_id=replica_id, saved_param="table")
            loaded = dist_checkpointing.load(template, str(out / load_from))
            load_paced_state(loaded, hybrid, fresh_selector, fresh_replay)
            # The fresh head is tau / beta everywhere; the residual keeps the rest.
            torch.testing.assert_close(hybrid.gather_acc_est(), saved["acc_est"], rtol=0,
                                       atol=1e-12)
    if save_to is not None:
        from megatron.core import dist_checkpointing

        (out / save_to).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(paced_sharded_state_dict(sharded, selectors["gather"][0],
                                                         replay, replica_id=replica_id),
                                str(out / save_to))
        (out / f"learned_{save_to}").mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(paced_sharded_state_dict(learned, selectors["gather"][0],
                                                         replay, replica_id=replica_id),
                                str(out / f"learned_{save_to}"))
        (out / f"posterior_{save_to}").mkdir(parents=True, exist_ok=True)
        sharded_posterior = BetaPosteriorTable(NUM_PROMPTS, prior=2.0, decay=0.9,
                                               dp_group=ctx.dp_group)
        load_blocks(sharded_posterior.state_tensors(),  # the reference's rows, this rank's block
                    {k: v[sharded_posterior.row_start:sharded_posterior.row_end]
                     for k, v in posterior.state_tensors().items()})
        dist_checkpointing.save(paced_sharded_state_dict(sharded, selectors["gather"][0], replay,
                                                         replica_id=replica_id,
                                                         estimator=sharded_posterior),
                                str(out / f"posterior_{save_to}"))
        expected = {"acc_est": reference.gather_acc_est(),
                    "posterior_acc_est": posterior.gather_acc_est(),
                    "posterior_visits": posterior.gather_visits(),
                    "learned_acc_est": learned.gather_acc_est(),
                    "head": [p.detach().clone() for p in learned.head.parameters()],
                    "head_exp_avg": learned.head.optimizer.state_dict()["state"][0]["exp_avg"],
                    "replay": [(i["row"], i["insertion"])
                               for i in replay_ref.state_dict()["items"]]}
        for field in ("values", "visits", "exp_avg", "exp_avg_sq"):
            expected[field] = getattr(reference, field).clone()
        if dist.get_rank() == 0:
            torch.save(expected, out / f"{save_to}.expected.pt")
        dist.barrier()
    destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    checks = CheckRecorder()
    # (tp, load, save): DP4 saves; DP2 loads it and saves; DP1 loads DP2's; DP4 loads DP2's.
    plan = [(1, None, "ckpt_dp4"), (2, "ckpt_dp4", "ckpt_dp2"), (4, "ckpt_dp2", None),
            (1, "ckpt_dp2", None)]
    for tp, load_from, save_to in plan:
        run_layout(tp, args.out, checks, load_from, save_to)
    checks.write(args.out / "checks.json")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
