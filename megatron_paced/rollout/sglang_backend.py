"""The synchronous SGLang backend: the /generate client
(:mod:`~megatron_paced.rollout.sglang_client`) and the weight transport
(:mod:`~megatron_paced.rollout.weight_sync`) behind the rollout interface. The asynchronous one
(``--max-staleness K``) extends it (:mod:`~megatron_paced.rollout.async_rollout`).

Usage::

    client = SGLangClient(urls, on_restart=lambda server: backend.on_server_restart(server))
    backend = SGLangBackend(client, TensorTransport(client, model_cfg, ctx))
    backend.sync_weights(policy.modules(), version=0)
    completions = backend.generate(prompts, n=8, sampling=sampling, seed=step)
"""

from __future__ import annotations

import torch

from megatron_paced.rollout.engine import done_future
from megatron_paced.rollout.sglang_client import ServerProcess


class SGLangBackend:
    """SGLang servers (or the project's rollout server) behind
    :class:`~megatron_paced.rollout.backend.RolloutBackend`: the /generate client, and the
    weight transport that pushes the policy into the servers."""

    asked_once_per_replica = True

    def __init__(self, client, transport) -> None:
        self.client, self.transport = client, transport
        self.model: list[torch.nn.Module] | None = None  # what the last push sent

    def on_server_restart(self, server) -> None:
        """The client restarted ``server`` (it holds no weights): push the current ones
        (collective, as every push)."""
        if self.model is None:
            raise RuntimeError("a rollout server restarted before any weights were pushed")
        self.transport.on_server_restart(self.model[0])

    def generate(self, prompts: list[list[int]], n: int, sampling, seed: int) -> list[list]:
        return self.client.generate(prompts, n=n, sampling=sampling, seed=seed)

    def submit(self, prompts: list[list[int]], n: int, sampling, seed: int,
               min_version: int | None = None):
        return done_future(self.generate(prompts, n, sampling, seed))

    def drain(self) -> None:
        """Nothing runs in the background."""

    def sync_weights(self, model: list[torch.nn.Module], version: int) -> None:
        self.model = model
        self.transport.push(model[0], version=str(version))

    def close(self) -> None:
        """Stop the servers this process launched and release the transport's staging."""
        self.client.close()
        self.transport.close()

    def kill_first_server(self) -> None:
        """Fault injection (--kill-rollout-server-after-step): SIGKILL the first rollout
        server this process launched, if any."""
        launched = [s for s in self.client.servers
                    if isinstance(s, ServerProcess) and s.process is not None]
        if launched:
            launched[0].process.kill()
            launched[0].process.wait()
