"""Rollout: generation backends (the embedded engine, SGLang servers), the project's rollout
server, and weight sync. The interface and the builder are in
:mod:`megatron_paced.rollout.backend`; the SGLang client in
:mod:`~megatron_paced.rollout.sglang_client`; the weight transports in
:mod:`~megatron_paced.rollout.weight_sync`; the server in :mod:`~megatron_paced.rollout.serve`.
"""

from megatron_paced.rollout.backend import (
    RolloutBackend, RolloutConfig, build_rollout, per_server_args,
)
from megatron_paced.rollout.sglang_backend import SGLangBackend

__all__ = ["RolloutBackend", "RolloutConfig", "SGLangBackend", "build_rollout",
           "per_server_args"]
