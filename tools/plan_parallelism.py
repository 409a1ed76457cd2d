"""Which TP x PP x DP layouts of a model fit in GPU memory: a table from megatron_paced.planner.

    python tools/plan_parallelism.py --model qwen2.5-7b --gpus 8
    python tools/plan_parallelism.py --model path/to/config.json --gpus 16 --colocate-sglang
    python tools/plan_parallelism.py --model llama3-70b --gpus 32 --tp 8 --pp 4   # one layout

Every layout is listed, best first (the fewest GPUs per model replica, then the least
pipelining; TP stays inside a node), with GiB per GPU on its worst pipeline stage; layouts
that do not fit or cannot be built say why. ``--tp/--pp`` prints one layout's first and last
stage in detail. The formulas and their sources are in megatron_paced/planner.py and
docs/planner.md.

Exit status: 0 when the layout (or at least one layout) fits, 1 when none does, 2 on bad input
(unknown model, unreadable config.json, --gpus not divisible by --tp x --pp, ...), with a
one-line message on stderr.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from megatron_paced.config import ConfigError, FlagParser, add_flags, description, from_args
from megatron_paced.models.config import ModelConfig
from megatron_paced.models.counting import KNOWN_MODELS, count_parameters, resolve_model
from megatron_paced.planner import (
    LayoutPlan,
    MemoryBreakdown,
    PlannerSettings,
    StagePlan,
    check_layout,
    gib,
    plan_layouts,
)

PROG = "plan_parallelism"
COLUMNS = MemoryBreakdown.DEVICE_TERMS
HEADERS = {"weights": "weights", "gradients": "grads", "optimizer": "optim",
           "activations": "activ", "logits": "logits", "reference": "ref", "sglang": "sglang",
           "reserved": "resv"}


@dataclass(frozen=True)
class TableRow:
    mark: str
    rank: str
    layout: str
    cells: list[str]
    verdict: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = FlagParser(prog=PROG, description=description(__doc__))
    parser.add_argument("--model", required=True,
                        help="config.json, a folder holding one, or a name: "
                        + ", ".join(sorted(KNOWN_MODELS)))
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs in all")
    parser.add_argument("--tp", type=int, help="check one layout: tensor parallel size")
    parser.add_argument("--pp", type=int, help="check one layout: pipeline parallel size")
    parser.add_argument("--mark", action="append", default=[], metavar="TPxPP",
                        help="mark this layout in the table, e.g. 2x1 (repeatable)")
    parser.add_argument("--fits-only", action="store_true",
                        help="list only the layouts that fit (and the marked ones)")
    parser.add_argument("--format", choices=("text", "markdown"), default="text",
                        help="layout table as aligned text or a markdown table")
    add_flags(parser, PlannerSettings, "memory model")
    args = parser.parse_args(argv)
    for mark in args.mark:
        tp, _, pp = mark.lower().partition("x")
        if not (tp.isdigit() and pp.isdigit()):
            parser.error(f"argument --mark: {mark!r} is not TPxPP (e.g. 2x1)")
    return args


def describe_model(name: str, model: ModelConfig) -> str:
    tied = "untied" if model.untie_embeddings_and_output_weights else "tied"
    return (f"{name}: {model.architecture}, {model.num_layers} layers, hidden "
            f"{model.hidden_size}, FFN {model.ffn_hidden_size}, {model.num_attention_heads} "
            f"heads / {model.num_query_groups} KV heads (head dim {model.head_dim}), vocab "
            f"{model.vocab_size} ({tied}); {count_parameters(model):,} parameters")


def describe_settings(num_gpus: int, s: PlannerSettings) -> str:
    optimizer = ("distributed optimizer" if s.use_distributed_optimizer
                 else "optimizer not sharded")
    reference = {"gpu": "reference on GPU", "host": "reference parked on host",
                 "none": "no reference"}[s.reference]
    sglang = (f"SGLang colocated at {s.sglang_mem_fraction:g} of the GPU" if s.colocate_sglang
              else "no colocated SGLang")
    prompts = f", log-Z table of {s.num_prompts} prompts" if s.num_prompts else ""
    return (f"{num_gpus} GPUs x {s.gpu_memory:g} GiB ({s.gpus_per_node} per node); micro batch "
            f"{s.micro_batch_size} x {s.seq_length} tokens, {s.params_dtype}, {s.recompute} "
            f"recompute, {optimizer}, {reference}, {sglang}, reserve {s.reserved_gib:g} GiB"
            f"{prompts}")


def format_params(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"


def verdict(plan: LayoutPlan) -> str:
    if plan.fits:
        return f"fits, {gib(plan.gpu_memory - plan.memory.total):.1f} GiB free"
    return plan.reason


def table_rows(plans: list[LayoutPlan], marks: set[tuple[int, int]], fits_only: bool,
               show_host: bool) -> tuple[list[TableRow], int]:
    rows, hidden, num_fit = [], 0, 0
    for plan in plans:
        marked = (plan.layout.tp, plan.layout.pp) in marks
        num_fit += plan.fits
        if fits_only and not plan.fits and not marked:
            hidden += 1
            continue
        memory = plan.memory
        if memory is None:
            cells = ["-"] * (len(COLUMNS) + 3 + show_host)
        else:
            cells = [plan.worst.name, format_params(plan.worst.num_params)]
            cells += [f"{gib(getattr(memory, name)):.1f}" for name in COLUMNS]
            cells.append(f"{gib(memory.total):.1f}")
            if show_host:
                cells.append(f"{gib(memory.host):.1f}")
        rows.append(TableRow("*" if marked else "", str(num_fit) if plan.fits else "-",
                             str(plan.layout), cells, verdict(plan)))
    return rows, hidden


def render_table(rows: list[TableRow], markdown: bool, show_host: bool) -> str:
    header = ["", "#", "layout", "stage", "params/GPU", *(HEADERS[c] for c in COLUMNS),
              "total", *(["host"] if show_host else []), "verdict"]
    body = [[r.mark, r.rank, r.layout, *r.cells, r.verdict] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i in (2, 3, len(header) - 1) else "--:"
                                for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *body]:
        cells = [cell.rjust(w) if i > 3 else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    return "\n".join(lines)


def render_stages(plan: LayoutPlan) -> str:
    """One layout: each stage's terms in GiB, one column per stage."""
    if plan.problems:
        return f"{plan.layout}: cannot be built: {plan.reason}"
    stages: tuple[StagePlan, ...] = plan.stages
    lines = [f"{'':14}" + "".join(f"{s.name + ' stage':>14}" for s in stages)]
    lines.append(f"{'params/GPU':14}" + "".join(f"{format_params(s.num_params):>14}"
                                                for s in stages))
    for name in MemoryBreakdown.DEVICE_TERMS:
        lines.append(f"{name + ' GiB':14}" + "".join(
            f"{gib(getattr(s.memory, name)):>14.2f}" for s in stages))
    lines.append(f"{'total GiB':14}" + "".join(f"{gib(s.memory.total):>14.2f}" for s in stages))
    if any(s.memory.host for s in stages):
        lines.append(f"{'host GiB':14}" + "".join(f"{gib(s.memory.host):>14.2f}"
                                                  for s in stages))
    status = verdict(plan) if plan.fits else f"does not fit: {plan.reason}"
    lines.append(f"{plan.layout}: {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings: PlannerSettings = from_args(PlannerSettings, args)
        model = resolve_model(args.model)
        if args.tp is not None or args.pp is not None:
            plan = check_layout(model, args.gpus, args.tp or 1, args.pp or 1, settings)
            plans = [plan]
        else:
            plans = plan_layouts(model, args.gpus, settings)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    # Markdown joins consecutive lines into one paragraph: keep a blank line between them.
    print(describe_model(args.model, model), end="\n\n" if args.format == "markdown" else "\n")
    print(describe_settings(args.gpus, settings), end="\n\n")
    if args.tp is not None or args.pp is not None:
        print(render_stages(plans[0]))
        return 0 if plans[0].fits else 1
    marks = {tuple(int(v) for v in m.lower().split("x")) for m in args.mark}
    show_host = any(p.memory is not None and p.memory.host for p in plans)
    rows, hidden = table_rows(plans, marks, args.fits_only, show_host)
    print(render_table(rows, args.format == "markdown", show_host))
    if hidden:
        print(f"\n{hidden} more layouts do not fit or cannot be built (drop --fits-only to see "
              "why).")
    return 0 if any(p.fits for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
