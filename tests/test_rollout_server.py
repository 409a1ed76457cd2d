"""The SGLang client against the rollout server in a subprocess (see
distributed/rollout_worker.py): log-probs equal the trainer's; weight pushes by disk, by tensor
and over a weight-update group change the server's outputs to the new weights' outputs; a
server killed mid-batch is restarted, rejoins the group and the batch completes with no prompt
lost or duplicated; weight updates need the API key."""

from __future__ import annotations

import pytest

from megatron_paced.testing.distributed import launch_and_read_checks

pytestmark = pytest.mark.distributed

EXPECTED = ["server_log_probs_equal_trainer", "tempered_sampling_returns_the_policy_log_probs",
            "disk_push_changes_outputs",
            "tensor_push_changes_outputs", "nccl_push_changes_outputs",
            "killed_server_restarts_and_batch_completes", "weight_updates_need_the_api_key",
            "distributed_updates_refuse_unknown_groups", "release_and_resume_memory",
            "paused_server_holds_requests_until_continue",
            "abort_mode_answers_abort_and_the_client_asks_again",
            "async_push_waits_for_the_generations_queued_before_it",
            "async_killed_server_is_given_its_weights_again"]


@pytest.fixture(scope="module")
def rollout_checks(tmp_path_factory):
    return launch_and_read_checks("tests.distributed.rollout_worker", nprocs=1,
                                  out=tmp_path_factory.mktemp("rollout"), timeout_s=600)


@pytest.mark.parametrize("name", EXPECTED)
def test_rollout_check(rollout_checks, name):
    assert name in rollout_checks, f"check {name} did not run"
    assert rollout_checks[name]["ok"], rollout_checks[name]["error"]


def test_server_refuses_public_bind_without_api_key():
    from tests.conftest import run_python

    result = run_python("-m megatron_paced.rollout.serve", "--host", "0.0.0.0", "--model",
                        "tiny-llama", timeout=60)
    assert result.returncode == 2
    assert "--host 0.0.0.0 is not a loopback address: give the server a key" in result.stderr
