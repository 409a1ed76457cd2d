"""The PACED state (log-Z table, selector, replay) as one Megatron sharded state dict.

The log-Z table and its optimizer state (and, with ``--log-z-param head|hybrid``, the prompt
features) are ``ShardedTensor`` blocks of global
(num_prompts,) tensors, so ``dist_checkpointing`` writes each row once and re-partitions on
load when the DP size changes. The replay buffer (small by design) and the selector's
settings are common state, written once and re-split by row on load.

The selector keeps no state across steps (its draws are keyed by the step); what it saves is
its settings and seed, and a resume reports every one that changed (the resumed run then
selects differently from the run it continues).

Usage::

    from megatron.core import dist_checkpointing
    paced = PacedState(table, selector, replay)
    dist_checkpointing.save(paced.sharded_state_dict(replica_id=(tp_rank, pp_rank)), ckpt_dir)
    ...
    loaded = dist_checkpointing.load(paced.sharded_state_dict(replica_id=...), ckpt_dir)
    changed = paced.load_state_dict(loaded)     # the selector settings that differ
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_paced.config import ConfigError
from megatron_paced.paced.log_z import ShardedLogZ


def estimator_name_of(estimator, table) -> str:
    """log-z, beta-posterior or oracle (--acc-estimator): the estimator's declared name."""
    return (table if estimator is None else estimator).name


def paced_sharded_state_dict(table, selector, replay, *, replica_id=(0,),
                             prefix: str = "paced.", saved_param: str | None = None,
                             estimator=None) -> dict:
    """Collective (the replay buffer is gathered). ``replica_id`` is all zeros on one
    replica (TP/PP peer) of each DP rank. ``saved_param``: when loading, the checkpoint's
    --log-z-param (a table checkpoint has no head or features to read)."""
    names = ShardedLogZ.TABLE_STATE if saved_param == "table" else None
    log_z = table.sharded_state_dict(prefix=f"{prefix}log_z.", replica_id=replica_id,
                                     names=names)
    out = {
        "log_z": log_z,
        "log_z_meta": {"num_prompts": table.num_prompts, "beta": table.beta,
                       "optimizer": table.optimizer, "param": table.param,
                       "acc_estimator": estimator_name_of(estimator, table)},
        "selector": selector.state_dict(),
        "replay": replay.state_dict(),
    }
    own = {} if estimator is None else estimator.sharded_state_dict(
        prefix=f"{prefix}acc_estimator.", replica_id=replica_id)
    if own:  # what the estimator learns beside log Z (the oracle has nothing to save)
        out["acc_estimator"] = own
    return out


def check_estimator(meta: dict, table, estimator) -> None:
    """Refuse a checkpoint whose --acc-estimator is not this run's (its state differs)."""
    saved, now = meta["acc_estimator"], estimator_name_of(estimator, table)
    if saved != now:
        raise ConfigError(f"--load: the checkpoint was trained with --acc-estimator {saved}; "
                          f"this run has --acc-estimator {now} (its state is not there)")


def load_paced_state(loaded: dict, table, selector, replay, estimator=None) -> list[str]:
    """Apply a loaded state; refuses a checkpoint of another table size or beta. Returns the
    selection settings that differ from the checkpoint's, each naming its flag."""
    meta = loaded["log_z_meta"]
    check_estimator(meta, table, estimator)
    if meta["num_prompts"] != table.num_prompts:
        raise ValueError(f"checkpoint's log-Z table has {meta['num_prompts']} prompts; this run "
                         f"has {table.num_prompts} (a different prompt set?)")
    if meta["beta"] != table.beta:
        raise ValueError(f"checkpoint was trained with --beta {meta['beta']}; this run has "
                         f"--beta {table.beta} (log_z lives on a 1/beta scale)")
    saved_param, param = meta["param"], table.param
    if param == "table":
        if saved_param != "table":
            raise ValueError(f"checkpoint was trained with --log-z-param {saved_param}; this "
                             "run has --log-z-param table, which cannot hold its head")
        table.load_state_dict(loaded["log_z"])
    else:
        table.load_state_dict(loaded["log_z"], saved_param=saved_param)
    replay.load_state_dict(loaded["replay"])
    if "acc_estimator" in loaded:
        estimator.load_state_dict(loaded["acc_estimator"])
    return selector.load_state_dict(loaded["selector"])


@dataclass
class PacedState:
    """The PACED components a checkpoint holds, saved and loaded as one."""

    log_z: object
    selector: object
    replay: object
    estimator: object = None
    """--acc-estimator's object when it is not log Z itself (None: log Z)."""

    def sharded_state_dict(self, replica_id=(0,), saved_param: str | None = None) -> dict:
        return paced_sharded_state_dict(self.log_z, self.selector, self.replay,
                                        replica_id=replica_id, saved_param=saved_param,
                                        estimator=self.estimator)

    def load_state_dict(self, loaded: dict) -> list[str]:
        return load_paced_state(loaded, self.log_z, self.selector, self.replay, self.estimator)
