"""Sharded == unsharded for the PACED components, and checkpoints across DP sizes.

One launch of 4 ranks (``distributed/paced_worker.py``) re-initializes the groups as DP 4, 2,
1 and 4 (TP peers hold replicas) and checks, against single-process references fed the same
global stream: log-Z lookups and updates (SGD and Adam, a 1001-row table with uneven blocks),
selections (all-reduce and candidate paths, with epsilon), replay buffer contents and draws
(exactly equal, plus a chi-square test of the draw frequencies against the priorities), and
dist_checkpointing save on DP4 -> load on DP2 -> save -> load on DP1 and on DP4 (table,
Adam state and replay buffer identical).
"""

from __future__ import annotations

import pytest

from megatron_paced.testing.distributed import launch_and_read_checks

pytestmark = pytest.mark.distributed

LAYOUTS = ("dp1", "dp2", "dp4")
EXPECTED = [
    *(f"log_z_lookup_and_update_equal_single_process[{dp},{opt}]" for dp in LAYOUTS
      for opt in ("sgd", "adam")),
    *(f"selection_equal_single_process[{dp},{opt}]" for dp in LAYOUTS for opt in ("sgd", "adam")),
    *(f"replay_equal_single_process[{dp}]" for dp in LAYOUTS),
    *(f"learned_log_z_equal_single_process[{dp}]" for dp in LAYOUTS),
    *(f"learned_selection_equal_single_process[{dp}]" for dp in LAYOUTS),
    *(f"beta_posterior_equal_single_process[{dp}]" for dp in LAYOUTS),
    *(f"replay_draws_follow_priorities[{dp}]" for dp in LAYOUTS),
    "checkpoint_reshards[ckpt_dp4->dp2]",
    "checkpoint_reshards[ckpt_dp2->dp1]",
    "checkpoint_reshards[ckpt_dp2->dp4]",
    *(f"{kind}[{path}]" for kind in ("learned_checkpoint_reshards",
                                     "beta_posterior_checkpoint_reshards",
                                     "table_checkpoint_loads_as_hybrid")
      for path in ("ckpt_dp4->dp2", "ckpt_dp2->dp1", "ckpt_dp2->dp4")),
]


@pytest.fixture(scope="module")
def paced_checks(tmp_path_factory):
    return launch_and_read_checks("tests.distributed.paced_worker", nprocs=4,
                                  out=tmp_path_factory.mktemp("paced"))


@pytest.mark.parametrize("name", EXPECTED)
def test_paced_check(paced_checks, name):
    assert name in paced_checks, f"check {name} did not run"
    assert paced_checks[name]["ok"], paced_checks[name]["error"]
