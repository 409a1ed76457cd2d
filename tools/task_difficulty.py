"""How hard the arithmetic task's training prompts are for a policy: each prompt's exact
accuracy (the oracle of ``megatron_paced/paced/estimators.py``), its spread, the shares that
sit at accuracy ~0 and ~1 (where no GRPO group has a signal), and the mean by level.

Takes ``paced-train``'s flags (the task, the model, ``--load``); prints a table and, with
``--out FILE``, writes the figures as JSON (the benchmark prints them for each task's base
policy).

Usage::

    python -m torch.distributed.run --standalone --nproc-per-node 1 -m tools.task_difficulty \\
        --load runs/bench/spread/base --task-max-digits 3 --task-operations + '*' --out d.json
"""

from __future__ import annotations

import json
import sys

import torch

EDGE = 0.05
"""A prompt 'sits at 0' below this accuracy and 'at 1' above 1 - EDGE."""


def difficulty(accuracy: torch.Tensor, problems) -> dict:
    """Summary figures of per-prompt accuracies (float64, one per problem)."""
    levels: dict[str, list[float]] = {}
    for problem, acc in zip(problems, accuracy.tolist()):
        op = "*" if "*" in problem.prompt else "+"
        levels.setdefault(f"{problem.num_digits}{op}", []).append(acc)
    return {
        "num_prompts": len(accuracy),
        "mean": float(accuracy.mean()),
        "std": float(accuracy.std()),
        "share_at_0": float((accuracy < EDGE).double().mean()),
        "share_at_1": float((accuracy > 1 - EDGE).double().mean()),
        "share_between": float(((accuracy >= EDGE) & (accuracy <= 1 - EDGE)).double().mean()),
        "by_level": {level: {"num": len(v), "mean": sum(v) / len(v)}
                     for level, v in sorted(levels.items())},
    }


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from megatron_paced.job import parse_args
    from megatron_paced.paced.estimators import OracleAccuracy
    from megatron_paced.train import build_trainer

    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--out" in argv:
        index = argv.index("--out")
        out = argv[index + 1]
        del argv[index:index + 2]
    job = parse_args([*argv, "--train-iters", "1", "--allow-random-init"])
    trainer = build_trainer(job)
    if job.checkpoint.load:
        trainer.checkpoints.load(job.checkpoint.load)
    oracle = OracleAccuracy(trainer.task, trainer.policy, trainer.ctx,
                            max_new_tokens=job.sampling.max_new_tokens)
    accuracy = oracle.acc_est(torch.arange(len(trainer.task.problems)))
    figures = difficulty(accuracy, trainer.task.problems)
    if dist.get_rank() == 0:
        print(f"{figures['num_prompts']} prompts: mean accuracy {figures['mean']:.3f} "
              f"(std {figures['std']:.3f}); at 0: {figures['share_at_0']:.0%}, at 1: "
              f"{figures['share_at_1']:.0%}, between: {figures['share_between']:.0%}")
        for level, row in figures["by_level"].items():
            print(f"  {level:>4}  {row['num']:5d} prompts  mean accuracy {row['mean']:.3f}")
        if out:
            with open(out, "w") as f:
                json.dump(figures, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
