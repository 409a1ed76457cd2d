"""Benchmark the PACED bookkeeping: prompt selection, replay sampling, log-Z all-to-all.

Prints two tables:

1. per table size (1e5, 1e6, 1e7 prompts), on one process and one CPU thread: the time of one
   selection step (paced-greedy, the paper's rule: median, p90 and worst of 100 steps that
   each follow a log-Z update of the selected prompts; the worst includes the occasional pool
   rebuild; the one-time set-up is shown apart), of paced-soft (one pass per step), and of one
   replay draw from a full 128-sample buffer;
2. per table size, selection with a learned log Z (``--log-z-param hybrid``: a 3-layer MLP of
   width 128 over 64-wide features): each step scores ``--selection-candidates`` (4096)
   prompts drawn from all of them, so its cost does not grow with the table; the log-Z update
   (head step + residual) of the selected prompts is timed apart;
3. the log-Z lookup and gradient return (all-to-all) for a realistic batch (512 prompts x 8
   samples) on 2 and 4 gloo processes, median of 20.

    python tools/bench_paced_ops.py                 # everything (launches torchrun for 2.)
    python tools/bench_paced_ops.py --sizes 100000  # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from megatron_paced.config import FlagParser, description


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f}"


def bench_selection(sizes: list[int], num: int, steps: int) -> None:
    from megatron_paced.paced.log_z import ShardedLogZ
    from megatron_paced.paced.replay import DistributedReplay, ReplayConfig, ReplaySample
    from megatron_paced.paced.selection import PromptSelector, SelectionConfig

    print(f"selection of {num} prompts and replay draws, 1 process, "
          f"{torch.get_num_threads()} thread(s), times in ms")
    print(f"{'prompts':>10} {'greedy setup':>12} {'greedy median':>13} {'p90':>8} {'worst':>8}"
          f" {'mean':>8} {'soft':>8} {'replay draw':>11}")
    for size in sizes:
        gen = torch.Generator().manual_seed(0)
        table = ShardedLogZ(size, beta=0.05, init_acc=0.5, lr=0.3)
        table.values[:] = torch.rand(size, generator=gen, dtype=torch.float64) * 20
        greedy = PromptSelector(SelectionConfig(selection_gather_max=0), seed=1)
        start = time.perf_counter()
        greedy.select(table, num, 0)
        setup = time.perf_counter() - start
        times = []
        for step in range(1, steps + 1):
            ids = greedy.select(table, num, step)
            table.apply_gradients(ids, torch.randn(num, generator=gen, dtype=torch.float64) * 10)
            start = time.perf_counter()
            greedy.select(table, num, step)
            times.append(time.perf_counter() - start)
        times.sort()
        soft = PromptSelector(SelectionConfig(prompt_selection="paced-soft",
                                              selection_gather_max=0), seed=1)
        soft.select(table, num, 0)
        start = time.perf_counter()
        soft.select(table, num, 1)
        soft_time = time.perf_counter() - start
        replay = DistributedReplay(ReplayConfig(replay_size=128, replay_per_step=64),
                                   num_prompts=size, seed=1)
        samples = [ReplaySample(int(i), torch.zeros(1024, dtype=torch.long), torch.ones(1024),
                                torch.zeros(1024), 1.0, 0)
                   for i in torch.randint(0, size, (256,), generator=gen)]
        replay.add(samples, torch.rand(256, generator=gen, dtype=torch.float64))
        draw_times = []
        for step in range(20):
            start = time.perf_counter()
            replay.sample(step)
            draw_times.append(time.perf_counter() - start)
        print(f"{size:>10} {_ms(setup):>12} {_ms(times[len(times) // 2]):>13} "
              f"{_ms(times[int(0.9 * len(times))])} {_ms(times[-1])} "
              f"{_ms(statistics.mean(times))} {_ms(soft_time)} "
              f"{_ms(statistics.median(draw_times)):>11}")


def bench_head_selection(sizes: list[int], num: int, steps: int, candidates: int,
                         feature_dim: int = 64, fit_steps: int = 8, window: int = 32) -> None:
    from megatron_paced.paced.learned_log_z import LearnedLogZ
    from megatron_paced.paced.selection import PromptSelector, SelectionConfig

    print(f"\nselection of {num} prompts with the learned log Z (hybrid, width 128, "
          f"{feature_dim}-wide features), {candidates} candidates per step; the update fits "
          f"the head {fit_steps} times on the last {window} steps' prompts; times in ms")
    print(f"{'prompts':>10} {'select median':>13} {'p90':>8} {'worst':>8} {'update median':>13}"
          f" {'MB features':>11}")
    for size in sizes:
        gen = torch.Generator().manual_seed(0)
        log_z = LearnedLogZ(size, param="hybrid", feature_dim=feature_dim, beta=0.05,
                            init_acc=0.5, lr=0.05, optimizer="running-mean",
                            fit_steps=fit_steps, window=window)
        log_z.set_features(torch.randn(size, feature_dim, generator=gen))
        selector = PromptSelector(SelectionConfig(selection_candidates=candidates), seed=1)
        select_times, update_times = [], []
        for step in range(steps):
            start = time.perf_counter()
            ids = selector.select(log_z, num, step)
            middle = time.perf_counter()
            log_z.apply_gradients(ids, torch.randn(num, generator=gen, dtype=torch.float64) * 10)
            select_times.append(middle - start)
            update_times.append(time.perf_counter() - middle)
        select_times.sort()
        print(f"{size:>10} {_ms(select_times[len(select_times) // 2]):>13} "
              f"{_ms(select_times[int(0.9 * len(select_times))])} {_ms(select_times[-1])} "
              f"{_ms(statistics.median(update_times)):>13} "
              f"{log_z.features.numel() * 4 / 2**20:>11.0f}")
        del log_z


def bench_all_to_all_worker(num_prompts: int, batch: int, repeats: int) -> None:
    """Run under torchrun: time lookup + apply_gradients of a batch split over DP ranks."""
    import torch.distributed as dist

    from megatron_paced.paced.log_z import ShardedLogZ

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    table = ShardedLogZ(num_prompts, beta=0.05, init_acc=0.5, lr=0.1, dp_group=dist.group.WORLD)
    gen = torch.Generator().manual_seed(rank)
    lookups, updates = [], []
    for _ in range(repeats + 2):
        ids = torch.randint(0, num_prompts, (batch // world,), generator=gen)
        dist.barrier()
        start = time.perf_counter()
        table.lookup(ids)
        middle = time.perf_counter()
        table.apply_gradients(ids, torch.randn(len(ids), generator=gen))
        end = time.perf_counter()
        lookups.append(middle - start)
        updates.append(end - middle)
    if rank == 0:
        print(f"{world:>4} {num_prompts:>10} {batch:>6} {_ms(statistics.median(lookups[2:]))} "
              f"{_ms(statistics.median(updates[2:]))}")
    dist.destroy_process_group()


def main() -> None:
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    parser.add_argument("--num-prompts-per-step", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--selection-candidates", type=int, default=4096)
    parser.add_argument("--dp-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=4096, help="samples (512 prompts x 8)")
    parser.add_argument("--all-to-all-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.all_to_all_worker:
        bench_all_to_all_worker(args.sizes[0], args.batch, repeats=20)
        return
    bench_selection(args.sizes, args.num_prompts_per_step, args.steps)
    bench_head_selection(args.sizes, args.num_prompts_per_step, min(args.steps, 40),
                         args.selection_candidates)
    print("\nlog-Z all-to-all (gloo, loopback), median of 20, ms")
    print(f"{'dp':>4} {'prompts':>10} {'batch':>6} {'lookup':>8} {'update':>8}")
    for dp in args.dp_sizes:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={dp}", os.path.abspath(__file__),
                        "--all-to-all-worker", "--sizes", str(max(args.sizes)),
                        "--batch", str(args.batch)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
