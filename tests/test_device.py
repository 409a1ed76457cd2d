"""The same training step on another device or precision gives the same numbers, to that
precision's tolerance: log-probs, PACED TB loss and gradients (log-Z's too), an Adam step, and
the embedded engine's greedy generation (a different token is allowed only at a near-tie).

* On every machine: bf16 mixed precision (``--bf16``) against fp32, on the CPU; and
  activation recomputation (``--recompute-granularity selective|full``) gives the very same
  numbers as none.
* On a GPU (``gpu`` marker, skipped without CUDA): CUDA fp32 and CUDA bf16 against the CPU's
  fp32; the rollout server checks (SGLang client, disk and CUDA-IPC weight sync to a server
  process) with the trainer and the server on the GPU; and paced-train itself on the GPU
  (NCCL, --bf16), killed and resumed, against an uninterrupted run.

Worker: ``tests/distributed/device_worker.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from megatron_paced.testing.distributed import launch_workers


@dataclass(frozen=True)
class Tolerance:
    log_probs: float      # max |diff| of token log-probs
    grads: float          # |g - g_ref| / |g_ref| over all parameters
    params: float         # relative to each weight (plus 3 learning rates) after an Adam step
    near_tie: float       # greedy tokens may differ only where the reference top-2 margin is below


FP32 = Tolerance(log_probs=1e-4, grads=1e-4, params=1e-5, near_tie=1e-3)
BF16 = Tolerance(log_probs=5e-2, grads=5e-2, params=2 ** -7, near_tie=5e-2)
LR = 1e-3  # the worker's Adam learning rate


def _run(out, dtypes, *flags, env=None) -> None:
    result = launch_workers("tests.distributed.device_worker", nprocs=1, timeout_s=600,
                            args=["--out", str(out), "--dtypes", *dtypes, *flags], env=env)
    assert result.returncode == 0, result.output[-6000:]


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[name].flatten() for name in sorted(tensors)])


def compare(ref: dict, other: dict, tol: Tolerance) -> None:
    """``other`` computed what ``ref`` computed, within ``tol``."""
    torch.testing.assert_close(other["log_probs"], ref["log_probs"], rtol=0, atol=tol.log_probs)
    assert other["loss"] == pytest.approx(ref["loss"], rel=tol.grads)
    g_ref, g = _flat(ref["grads"]), _flat(other["grads"])
    assert float((g - g_ref).norm() / g_ref.norm()) < tol.grads
    torch.testing.assert_close(other["log_z_grad"], ref["log_z_grad"], rtol=tol.grads,
                               atol=tol.grads * float(ref["log_z_grad"].abs().max()))
    assert other["grad_norm"] == pytest.approx(ref["grad_norm"], rel=tol.grads)
    p_ref, p = _flat(ref["params"]), _flat(other["params"])
    assert bool(((p - p_ref).abs() <= tol.params * p_ref.abs() + 3 * LR).all())
    # Greedy generation: the same tokens until a near-tie of the reference, per row.
    mask = ref["greedy_mask"].bool()
    num_compared = 0
    for row in range(mask.shape[0]):
        for t in torch.nonzero(mask[row]).flatten().tolist():
            if other["greedy_tokens"][row, t] != ref["greedy_tokens"][row, t]:
                margin = float(ref["greedy_margins"][row, t])
                assert margin < tol.near_tie, (
                    f"row {row} position {t}: greedy token {int(other['greedy_tokens'][row, t])}"
                    f" vs {int(ref['greedy_tokens'][row, t])} with a top-2 margin of {margin}")
                break
            num_compared += 1
    assert num_compared >= mask.sum() // 2, f"only {num_compared} greedy tokens agreed"


def check_self_consistent(record: dict, device: str, dtype: str) -> None:
    """What ran is what was asked for; the engine's log-probs are the trainer's."""
    assert record["device"] == device
    assert record["param_dtypes"] == [f"torch.{dtype}"]
    assert record["main_grad_dtypes"] == ["torch.float32"]  # Megatron DDP's fp32 grad buffer
    mask = record["greedy_mask"].bool()
    assert mask.any(dim=1).all()
    torch.testing.assert_close(record["greedy_log_probs"][mask],
                               record["greedy_recomputed"][mask], rtol=0,
                               atol=FP32.log_probs if dtype == "float32" else BF16.log_probs)


def check_recompute_changes_nothing(out, device: str, tolerance: float = 0.0) -> None:
    """Recomputed activations are the same computation: the same numbers, bit for bit on the
    CPU (``tolerance`` for GPU kernels that may sum in another order)."""
    plain = torch.load(out / f"{device}-float32.pt")
    for granularity in ("selective", "full"):
        recomputed = torch.load(out / f"{device}-recompute-{granularity}.pt")
        assert recomputed["num_recomputed"] > 0, f"{granularity}: nothing was recomputed"
        for key in ("log_probs", "log_z_grad", "grads", "params", "loss", "grad_norm"):
            torch.testing.assert_close(recomputed[key], plain[key], rtol=tolerance,
                                       atol=tolerance)


@pytest.mark.distributed
def test_bf16_step_matches_fp32_and_recompute_changes_nothing_on_cpu(tmp_path):
    _run(tmp_path, ["float32", "bfloat16"], "--recompute", env={"CUDA_VISIBLE_DEVICES": ""})
    check_recompute_changes_nothing(tmp_path, "cpu")
    fp32, bf16 = (torch.load(tmp_path / f"cpu-{d}.pt") for d in ("float32", "bfloat16"))
    check_self_consistent(fp32, "cpu", "float32")
    check_self_consistent(bf16, "cpu", "bfloat16")
    compare(fp32, bf16, BF16)
    # bf16 is not fp32 in disguise: the weights were rounded.
    assert not torch.equal(_flat(fp32["params"]), _flat(bf16["params"]))


@pytest.mark.gpu
def test_cuda_step_and_generation_match_cpu(tmp_path):
    _run(tmp_path, ["float32"], env={"CUDA_VISIBLE_DEVICES": ""})
    _run(tmp_path, ["float32", "bfloat16"], "--recompute")
    cpu = torch.load(tmp_path / "cpu-float32.pt")
    for dtype, tol in (("float32", FP32), ("bfloat16", BF16)):
        cuda = torch.load(tmp_path / f"cuda-{dtype}.pt")
        check_self_consistent(cuda, "cuda", dtype)
        compare(cpu, cuda, tol)
    check_recompute_changes_nothing(tmp_path, "cuda", tolerance=1e-5)


@pytest.mark.gpu
def test_rollout_server_and_cuda_ipc_weight_sync_on_gpu(tmp_path):
    from tests.test_rollout_server import EXPECTED
    from megatron_paced.testing.distributed import launch_and_read_checks

    checks = launch_and_read_checks("tests.distributed.rollout_worker", nprocs=1, out=tmp_path)
    assert set(EXPECTED) <= set(checks)
    failed = {name: c["error"] for name, c in checks.items() if not c["ok"]}
    assert not failed, failed
    assert (tmp_path / "device.txt").read_text() == "cuda"


@pytest.mark.gpu
def test_trainer_on_gpu_bf16_kill_and_resume_equals_uninterrupted(tmp_path):
    from tests.helpers.train_runs import COMMON, read_metrics

    full, killed = tmp_path / "full", tmp_path / "killed"
    flags = COMMON + ["--train-iters", "4", "--bf16", "--deterministic-mode",
                      "--eval-interval", "4", "--eval-num-prompts", "8"]
    for args, expect in ((flags + ["--save", str(full)], 0),
                         (flags + ["--save", str(killed), "--exit-after-step", "3"], 17),
                         (flags + ["--save", str(killed), "--load", str(killed)], 0)):
        result = launch_workers("megatron_paced.train", nprocs=1, args=args, timeout_s=600)
        assert result.returncode == expect or (expect and result.returncode), \
            result.output[-5000:]
    uninterrupted = read_metrics(full / "metrics.jsonl")
    resumed = read_metrics(killed / "metrics.jsonl")
    assert sorted(resumed) == [0, 1, 2, 3, 4] and "eval_pass@1" in resumed[4]
    assert resumed == uninterrupted
