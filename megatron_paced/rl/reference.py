"""The KL reference's weights over a run: the policy at RL step 0 (after --load and the SFT
warm start), saved once as ``<save>/reference`` (weights only) and reloaded from
``<load>/reference`` when a run resumes, so that a resumed run's KL terms use the same
reference as the run it continues.

Usage::

    prepare_reference(reference, policy, step=trainer.step, load=job.checkpoint.load,
                      save=job.checkpoint.save, algo="flowrl")
"""

from __future__ import annotations

import os

from megatron_paced.checkpointing import (
    check_loadable, iteration_dir, load_model_weights, save_model_checkpoint,
)
from megatron_paced.config import ConfigError


def prepare_reference(reference, policy, *, step: int, load: str | None, save: str | None,
                      algo: str) -> None:
    """At ``step`` 0 copy the policy into ``reference``, else load ``<load>/reference``
    (a ConfigError naming --load where it is missing); then save it under ``save`` unless
    ``save`` is the folder it came from."""
    if step == 0:
        reference.copy_from(policy)
    else:
        root = os.path.join(load, "reference")
        saved = check_loadable(root, reference.model_cfg, may_be_empty=True)
        if saved is None:
            raise ConfigError(f"--load {load!r}: resuming --algo {algo} needs the KL "
                              f"reference saved at step 0 in {root}")
        load_model_weights(iteration_dir(root, saved), reference.model[0], reference.model_cfg,
                           reference.ctx)
    if save and (step == 0 or os.path.abspath(save) != os.path.abspath(load)):
        save_model_checkpoint(os.path.join(save, "reference"), reference.model[0],
                              reference.model_cfg)
