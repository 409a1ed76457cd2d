"""tools/bench_sample_efficiency.py: its analysis (tools/sample_efficiency_analysis.py) on
known curves, pass@k, and (slow) the whole pipeline reduced to 1 seed and 2 steps: base
policy, four methods, results, plots; every method's flags (tools/sample_efficiency_runs.py)
through the trainer's start-up checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_paced.rl.evaluate import pass_at_k
from tests.conftest import run_python
from tools import bench_sample_efficiency as bench
from tools import sample_efficiency_analysis as analysis
from tools import sample_efficiency_runs as runs


def test_pass_at_k_is_the_unbiased_estimator():
    n = 8
    num_correct = torch.arange(n + 1)
    for k in (1, 2, 4, 8):
        expected = [1 - math.comb(n - c, k) / math.comb(n, k) for c in range(n + 1)]
        assert torch.allclose(pass_at_k(num_correct, n, k), torch.tensor(expected,
                                                                         dtype=torch.float64))
    assert pass_at_k(torch.tensor([3]), 8, 1).item() == pytest.approx(3 / 8)


def _run(seed, accuracies, samples_per_step=100):
    curve = [{"step": 5 * i, "num_samples": 5 * i * samples_per_step, "eval_pass@1": a,
              "eval_pass@8": min(1.0, 2 * a)} for i, a in enumerate(accuracies)]
    return {"seed": seed, "curve": curve, "rows": curve}


def test_reaching_the_target_uses_the_smoothed_curve():
    # A one-evaluation spike does not count; a sustained rise does (centered 3-point mean).
    run = _run(1, [0.3, 0.3, 0.6, 0.3, 0.3, 0.5, 0.5, 0.5])
    assert analysis.smoothed([0.3, 0.6, 0.3]) == pytest.approx([0.3, 0.4, 0.45])
    hit = analysis.first_reaching(run["curve"], 0.45)
    assert hit["step"] == 30 and hit["num_samples"] == 3000
    assert analysis.first_reaching(run["curve"], 0.3)["step"] == 0  # the base already
    assert analysis.first_reaching(run["curve"], 0.9) is None


def test_ratio_pairs_seeds_and_flags_unreached_targets():
    fast = [_run(s, [0.3, 0.5, 0.5, 0.5, 0.5]) for s in (1, 2)]
    slow = [_run(1, [0.3, 0.3, 0.3, 0.5, 0.5]), _run(2, [0.3, 0.3, 0.3, 0.3, 0.3])]
    a, b = analysis.reach(fast, 0.4), analysis.reach(slow, 0.4)
    assert a["samples"]["per_seed"] == [500, 500] and a["num_reached"] == 2
    assert b["samples"]["per_seed"] == [1500, None] and b["num_reached"] == 1
    result = analysis.ratio(a, b)
    assert result["per_seed"]["per_seed"] == [pytest.approx(1 / 3)]
    assert result["of_means"] == pytest.approx(500 / 1500)
    assert not result["all_seeds_reached"] and result["interval95"] is None  # one pair
    stats = analysis.stats([1.0, 3.0, None])
    assert stats["mean"] == 2.0 and stats["std"] == pytest.approx(math.sqrt(2))
    # Two pairs: mean 2, std sqrt(2), t(1) = 12.706: 2 +- 12.706 x sqrt(2) / sqrt(2).
    assert analysis.interval95(stats) == pytest.approx([2 - 12.706, 2 + 12.706])
    # Where a method sits between uniform selection (0) and the oracle (1), in samples.
    def entry(mean):
        return {"samples": {"mean": mean}}
    assert analysis.oracle_share(entry(800), entry(1000), entry(600)) == pytest.approx(0.5)
    assert analysis.oracle_share(entry(None), entry(1000), entry(600)) is None
    assert analysis.oracle_share(entry(800), entry(1000), entry(1200)) is None  # no saving


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x", "--methods", "paced,ppo"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x", "--task", "gsm8k"])  # a dataset needs --model


# Four methods run end to end on both CPU tasks (rounds of two parallel runs): PACED-RL with
# selection and replay, with the oracle's and the Beta posterior's selection, and GRPO;
# FlowRL and DAPO's accounting run in test_train.py, and every method's flags pass the
# trainer's start-up validation below.
REDUCED_METHODS = ["paced", "paced-oracle", "paced-beta", "grpo"]
REDUCED = ["--seeds", "1", "--steps", "2", "--eval-interval", "1", "--eval-num-prompts", "16",
           "--eval-k", "4", "--eval-final-k", "8", "--sft-iters", "10",
           "--methods", ",".join(REDUCED_METHODS)]


@pytest.mark.slow
def test_reduced_benchmark_runs_methods_through_the_trainer(tmp_path):
    out = tmp_path / "bench"
    result = run_python("-m tools.bench_sample_efficiency", "--out", str(out), *REDUCED,
                        timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for task in runs.CPU_TASKS:
        results = json.loads((out / task / "results.json").read_text())
        assert sorted(results["methods"]) == sorted(REDUCED_METHODS)
        # Every run started from the task's one base policy: identical step-0 evaluations.
        assert results["base"]["num_runs"] == 4 and results["base"]["spread_pass@1"] == 0
        # The target is on the exact training-set accuracy, logged at every evaluation.
        assert results["target_metric"] == "train_acc_exact"
        assert 0 <= results["base"]["train_acc_exact"] <= 1
        difficulty = results["base_difficulty"]  # the exact per-prompt accuracy of the base
        assert difficulty["mean"] == pytest.approx(results["base"]["train_acc_exact"],
                                                   abs=1e-4)
        assert difficulty["num_prompts"] == {"add": 256, "spread": 512}[task]
        assert difficulty["share_at_0"] + difficulty["share_at_1"] + \
            difficulty["share_between"] == pytest.approx(1)
        for method, summary in results["methods"].items():
            total = summary["samples_total"]["per_seed"][0]
            assert total == 2 * 16 * 8
            # pass@8 from the last evaluation only (--eval-final-k), the rest from 3
            assert set(summary["final"]) == {"pass@1", "pass@2", "pass@4", "pass@8"}
            assert 0 <= summary["final"]["pass@1"]["mean"] <= \
                summary["final"]["pass@8"]["mean"] <= 1
            # An estimate to score: PACED's log Z and the Beta posterior (not the oracle).
            assert (summary["calibration_error"] is None) == (
                method not in ("paced", "paced-beta")), method
            assert 0 <= summary["final_train_acc"]["mean"] <= 1
            assert isinstance(summary["wall_time_s"]["mean"], float)  # reported, not asserted
            assert summary["grad_noise_scale"]["per_seed"][0] is not None  # every run logs it
        assert "share_of_oracle_gain" in results
    metrics = (out / "add" / "runs" / "paced" / "seed1" / "metrics.jsonl").read_text()
    step = json.loads(metrics.splitlines()[-1])
    assert len(step["prompt_acc_est"]) == len(step["prompt_acc_obs"]) == 16
    assert not list((out / "add" / "runs" / "paced" / "seed1").glob("iter_*"))  # no weights
    for name in ("accuracy_vs_samples", "pass_at_k", "calibration"):
        assert (out / "spread" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| PACED-RL |" in result.stdout and "PACED-RL / GRPO" in result.stdout
    assert "== task spread ==" in result.stdout and "at 0:" in result.stdout
    # Finished runs are reused: a second call only analyzes.
    again = run_python("-m tools.bench_sample_efficiency", "--out", str(out), *REDUCED,
                       timeout=300)
    assert again.returncode == 0 and again.stdout.count("done before, reused") == 8


def test_every_cpu_method_passes_the_trainers_startup_checks(tmp_path):
    """Each method's flags on the CPU task, as the benchmark passes them, through paced-train's
    parser and start-up validation (batch arithmetic, selection and replay settings)."""
    from megatron_paced.job import parse_args
    from megatron_paced.validation import validate_startup

    args = bench.parse_args(["--out", str(tmp_path)])
    for args.cpu_task in runs.CPU_TASKS:
        for method, (_, flags) in runs.METHODS.items():
            job = parse_args([*runs.task_flags(args), *flags, "--train-iters", "3",
                              "--allow-random-init",
                              *(runs.PROBE if method in runs.HAS_LOG_Z else [])])
            validate_startup(job, world_size=args.nproc).task.close()
            assert job.algorithm.algo == method.split("-")[0]


@pytest.mark.parametrize("task", ["gsm8k", "math500-l1-2"])
def test_gpu_variant_runs_parse_with_the_trainers_flags(tmp_path, task):
    """The SmolLM2 runs are for a GPU machine; their flags are checked here against
    paced-train's own parser, on SmolLM2's config.json."""
    from megatron_paced.models.config import PRESETS
    from megatron_paced.job import parse_args

    args = bench.parse_args(["--out", str(tmp_path), "--model", "smollm2-135m", "--task", task])
    hf = tmp_path / "base" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps(PRESETS["smollm2-135m"].to_hf_config()))
    for method, (_, flags) in runs.METHODS.items():
        if method == "paced-oracle":
            continue  # the oracle needs one answer string per prompt: the CPU tasks only
        job = parse_args([*runs.task_flags(args), *flags, "--load", str(tmp_path / "base"),
                           "--train-iters", "3"])
        assert job.model.hidden_size == 576 and job.model.num_layers == 30
        assert job.task.task == task.split("-")[0] and job.task.tokenizer == str(hf)
        assert job.algorithm.algo == method.split("-")[0]
        assert job.batch.dynamic_sampling == (method == "grpo-dapo")
        assert job.data.max_prompt_length + job.sampling.max_new_tokens <= \
            job.model.max_position_embeddings
    if task == "math500-l1-2":
        assert job.task.task_levels == [1, 2]


def test_regime_map_reads_each_cells_savings_share_and_noise_scale(tmp_path, capsys):
    """tools/regime_map.py on two hand-made cells: prompts per step from the command, the
    oracle-gain share from final accuracies, B / B_noise from the runs' noise scales."""
    from tools import regime_map

    def summary(final, informative, noise, ratio):
        entry = {"mean": final, "std": 0.0, "per_seed": [final]}
        return {"steps": 40, "seeds": [1], "samples_total": {"mean": 5120.0},
                "final_train_acc": entry, "informative_group_fraction": {"mean": informative},
                "final": {"pass@16": {"mean": 0.2}}, "grad_noise_scale": {"mean": noise},
                "batch_over_noise_scale": {"mean": ratio}}

    for prompts, oracle in ((4, 0.20), (16, 0.15)):
        cell = tmp_path / f"p{prompts}"
        cell.mkdir()
        results = {"command": f"tools/bench_sample_efficiency.py --num-prompts-per-step "
                              f"{prompts}",
                   "methods": {"grpo": summary(0.10, 0.25, 200.0, 0.5),
                               "paced-oracle": summary(oracle, 0.98, 100.0, 1.0),
                               "paced": summary(0.125, 0.40, 150.0, None)},
                   "ratios_to_grpo_by_target_fraction": {
                       "1.0": {"paced": {"of_means": 0.7, "per_seed": {"per_seed": []}},
                               "paced-oracle": {"of_means": 0.5,
                                                "per_seed": {"per_seed": [0.5]}}},
                       "0.5": {"paced": {"of_means": 0.6, "per_seed": {"per_seed": [0.6]}}}}}
        (cell / "results.json").write_text(json.dumps(results))
    assert regime_map.main([str(tmp_path / "p16"), str(tmp_path / "p4"),
                            "--plot", str(tmp_path / "map.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| 4 ") or line.startswith("| 16 ")]
    assert rows[0].startswith("| 4 | GRPO |") and len(rows) == 6  # sorted by batch, GRPO first
    paced4 = next(r for r in rows if r.startswith("| 4 | PACED-RL |"))
    # share (0.125 - 0.10) / (0.20 - 0.10); no seed pair reached GRPO's final; B/B_noise "-"
    assert paced4 == ("| 4 | PACED-RL | 40 (5120) | 1 | 0.125 | 0.70 (0/1 seeds reached) "
                      "| 0.60 | 0.25 | 0.40 | 0.200 | 150 | - |")
    oracle16 = next(r for r in rows if r.startswith("| 16 | PACED-RL, oracle"))
    assert "| 0.150 | 0.50 | - | 1.00 | 0.98 |" in oracle16
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
