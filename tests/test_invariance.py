"""Invariance across parallel layouts: TP1 == TP2 == PP2 == DP2 == TP2xPP2 == ... .

Three torchrun launches (world 1, 2 and 4; see ``distributed/invariance_worker.py``) build the
same seeded tiny Llama, Qwen2 and Qwen3 policies on 8 layouts and save full (unsharded)
tensors. Each layout is compared with the single-process run:

* token log-probs of a fixed batch: relative error <= 1e-5;
* initial parameters: identical (initialization depends on seed and parameter name only);
* after one SGD step (lr 1, clipped to norm 1): every parameter tensor within 1e-5 relative,
  the whole-model update within 1e-5 relative, the reported grad norm within 1e-5;
* after two AdamW steps: the whole model within 1e-5 relative and the grad norms within 1e-5.
  (Adam's first step is ~lr * sign(g) elementwise, so a gradient entry that is zero up to
  float roundoff can flip; this is why the per-tensor check uses SGD.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_paced.testing.distributed import launch_workers, read_checks

pytestmark = pytest.mark.distributed

FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-qwen3")
LAUNCHES = {1: ["1x1"], 2: ["2x1", "1x2", "1x1"], 4: ["2x2", "2x1", "1x2", "1x1"]}
LAYOUTS = ["tp2pp1dp1", "tp1pp2dp1", "tp1pp1dp2", "tp2pp2dp1", "tp2pp1dp2", "tp1pp2dp2",
           "tp1pp1dp4"]
REFERENCE = "tp1pp1dp1"
RTOL = 1e-5


@pytest.fixture(scope="module")
def invariance_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("invariance")
    for world_size, layouts in LAUNCHES.items():
        result = launch_workers("tests.distributed.invariance_worker", nprocs=world_size,
                                args=["--out", str(out), "--layouts", *layouts])
        assert result.returncode == 0, result.output[-6000:]
    return out


def _load(out: Path, layout: str, family: str) -> dict:
    return torch.load(out / f"{layout}__{family}.pt")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _flat(params: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([params[name].flatten().double() for name in names])


def test_worker_checks_pass(invariance_dir):
    failures, names = {}, set()
    for world_size in LAUNCHES:
        for name, result in read_checks(invariance_dir / f"checks_world{world_size}.json").items():
            names.add(name)
            if not result["ok"]:
                failures[name] = result["error"]
    assert not failures, "\n".join(f"{k}:\n{v}" for k, v in failures.items())
    for layout in [REFERENCE, *LAYOUTS]:
        assert f"reference_is_a_frozen_copy[{layout}]" in names
        assert f"feature_cache_reads_what_is_computed[{layout},{FAMILIES[0]}]" in names
        for family in FAMILIES:
            assert f"log_probs_on_every_stage[{layout},{family}]" in names
            if "pp1" in layout:  # a plain forward needs the whole model on one rank
                assert f"engine_log_probs_equal_trainer[{layout}]" in names
                assert f"last_prompt_feature_predicts_the_next_token[{layout},{family}]" in names
                assert f"vocab_parallel_log_probs_equal_log_softmax[{layout},{family}]" in names


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(invariance_dir, layout, family):
    ours, ref = _load(invariance_dir, layout, family), _load(invariance_dir, REFERENCE, family)
    names = sorted(ref["params_init"])
    assert sorted(ours["params_init"]) == names

    assert _rel(ours["log_probs"], ref["log_probs"]) <= RTOL
    assert (ours["log_probs"] != 0).sum() > 0
    for pooling in ("mean", "last"):  # prompt features for a learned log-Z head
        assert ours[f"features_{pooling}"].shape == ref[f"features_{pooling}"].shape
        assert _rel(ours[f"features_{pooling}"], ref[f"features_{pooling}"]) <= RTOL
        assert _rel(ours[f"log_z_head_{pooling}"], ref[f"log_z_head_{pooling}"]) <= RTOL
        assert float(ref[f"log_z_head_{pooling}"].std()) > 0  # the head's step moved it
    assert not torch.allclose(ref["features_mean"], ref["features_last"])

    for name in names:
        assert torch.equal(ours["params_init"][name], ref["params_init"][name]), name

    for name in names:
        assert _rel(ours["params_sgd"][name], ref["params_sgd"][name]) <= RTOL, name
    update_ours = _flat(ours["params_sgd"], names) - _flat(ours["params_init"], names)
    update_ref = _flat(ref["params_sgd"], names) - _flat(ref["params_init"], names)
    assert update_ref.norm() > 0.5  # the step really moved the weights (clipped norm 1)
    assert _rel(update_ours, update_ref) <= RTOL
    assert ours["grad_norms_sgd"] == pytest.approx(ref["grad_norms_sgd"], rel=RTOL)

    assert _rel(_flat(ours["params_adam"], names), _flat(ref["params_adam"], names)) <= RTOL
    assert ours["grad_norms_adam"] == pytest.approx(ref["grad_norms_adam"], rel=RTOL)
    assert ref["grad_norms_adam"][1] != ref["grad_norms_adam"][0]  # the first step changed grads


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_gradients_match_single_process_shards(invariance_dir, layout):
    """What the gradient noise scale reads (models.policy.LocalGradients): on DP > 1 each
    rank's squared norm of its local mean gradient before the DP reduction, over its TP and
    PP shards, equals the one process's on the same rows; on DP 1 without a pipeline it is
    the first micro-batch's gradient, read from the buffers before the second micro-batch
    (equal to that micro-batch's rows run alone); on DP 1 with a pipeline, none."""
    ours = _load(invariance_dir, layout, FAMILIES[0])["rl_paced"]
    ref = _load(invariance_dir, REFERENCE, FAMILIES[0])["rl_paced"]
    dp = int(layout.split("dp")[1])
    assert len(ours["local_sq"]) == dp
    first = ref["shard_sq"]["first_micro_batch"]
    if dp == 1 and "pp2" in layout:
        assert ours["local_sq"].isnan().all()
        return
    expected = torch.tensor(ref["shard_sq"][dp] if dp > 1 else [first], dtype=torch.float64)
    torch.testing.assert_close(ours["local_sq"], expected, rtol=RTOL, atol=0)
    assert float(ref["local_sq"][0]) == pytest.approx(first, rel=RTOL)
    assert first != pytest.approx(ref["grad_norm"] ** 2, rel=1e-2)  # not the whole batch's
    assert sum(ref["shard_sq"][4]) / 4 > ref["grad_norm"] ** 2  # the noise: E|G_b|^2 > |G_B|^2


def _assert_same_update(ours: dict, ref: dict, init: dict) -> None:
    """The whole-model update from ``init`` is the reference's, within RTOL (and not ~0)."""
    names = sorted(init)
    update_ours = _flat(ours["params"], names) - _flat(init, names)
    update_ref = _flat(ref["params"], names) - _flat(init, names)
    assert update_ref.norm() > 0.1
    assert _rel(update_ours, update_ref) <= RTOL


@pytest.mark.parametrize("algo", ["paced", "grpo"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_several_optimizer_steps_per_rollout_match_single_process(invariance_dir, layout, algo):
    """--num-steps-per-rollout 2: the mini-batches are the same rows on every layout, so the
    two updates and their grad norms equal the one process's; the second step differs from
    the first (the policy moved away from the anchor)."""
    ours = _load(invariance_dir, layout, FAMILIES[0])[f"rl_{algo}_mini_steps"]
    ref = _load(invariance_dir, REFERENCE, FAMILIES[0])[f"rl_{algo}_mini_steps"]
    init = _load(invariance_dir, REFERENCE, FAMILIES[0])["params_init"]
    _assert_same_update(ours, ref, init)
    assert ours["grad_norms"] == pytest.approx(ref["grad_norms"], rel=RTOL)
    assert ref["grad_norms"][0] != pytest.approx(ref["grad_norms"][1], rel=1e-3)


@pytest.mark.parametrize("algo", ["paced", "flowrl", "flowrl-proj-z", "grpo"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rl_losses_match_single_process(invariance_dir, layout, algo):
    """One SGD step of each RL loss through Megatron's schedule: the same weight update and
    the same per-sample log-Z gradients (2 delta for PACED, none for GRPO) on every layout;
    FlowRL's ProjZ head (log Z from the prompt's hidden states) starts equal everywhere and
    takes the same step as the policy."""
    family = FAMILIES[0]
    ours = _load(invariance_dir, layout, family)[f"rl_{algo}"]
    ref = _load(invariance_dir, REFERENCE, family)[f"rl_{algo}"]
    init = _load(invariance_dir, REFERENCE, family)["params_init"]
    if algo == "flowrl-proj-z":
        head = sorted(name for name in ref["params"] if name.startswith("proj_z."))
        assert len(head) == 10  # 3 linear layers and 2 LayerNorms, weight and bias each
        for name in head:
            assert torch.equal(ours["params_before"][name], ref["params_before"][name]), name
        init = {**init, **{name: ref["params_before"][name] for name in head}}
        moved = _flat(ref["params"], head) - _flat(init, head)
        assert moved.norm() > 0  # the loss trains the head
        assert not ref["log_z_grad"].any()  # and not the batch's log Z, which it replaced
        ref = {**ref, "log_z_grad": None}
    _assert_same_update(ours, ref, init)
    assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL)
    if algo == "grpo":
        assert not ref["log_z_grad"].any()
    elif ref["log_z_grad"] is not None:
        assert ref["log_z_grad"].abs().min() > 0
        assert _rel(ours["log_z_grad"], ref["log_z_grad"]) <= RTOL
