"""Worker: the SGLang client against a rollout server in a subprocess.

Started with torchrun (world 1; the policy lives in this process, the server in another):

1. generation with n > 1: the server's log-probs equal this process's trainer log-probs of
   the same tokens (1e-5);
2. a weight push (disk, tensor, then nccl: a broadcast over a weight-update group, here on
   gloo) after an optimizer step: the server reports the new weight_version, its greedy
   outputs equal the local engine's with the new weights, and its log-probs equal the new
   trainer log-probs;
3. the server is killed after the first response of a batch: the client restarts it, the
   restart hook forms a new weight-update group and re-pushes the current weights, and the
   batch completes with every (prompt, sample) exactly once and the right log-probs;
4. the API key: weight updates without it are refused (401); a weight-update group that was
   never formed, or NCCL on a CPU server, is refused (400);
5. /pause_generation holds new requests until /continue_generation (abort mode answers
   them aborted, and the client asks again: every slot filled once); the asynchronous
   backend applies a push only after the generation queued before it (tagged with the old
   version, the next with the new one), and a server killed under it is restarted, given
   the last applied weights again, and the request completes.

    torchrun --nproc-per-node 1 -m tests.distributed.rollout_worker --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import urllib.error
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_paced.config import OptimizerConfig, ParallelConfig
from megatron_paced.forward_backward import SequenceBatch, compute_log_probs, forward_backward
from megatron_paced.losses import nll_loss
from megatron_paced.models.config import PRESETS
from megatron_paced.models.policy import build_policy
from megatron_paced.parallel import initialize_parallel
from megatron_paced.rollout.engine import EmbeddedEngine, SamplingParams, completions_to_batch
from megatron_paced.rollout.sglang_client import SGLangClient, ServerProcess, serve_command
from megatron_paced.rollout.update_group import DistributedTransport
from megatron_paced.rollout.weight_sync import (
    DiskTransport, TensorTransport, weight_update_session,
)
from megatron_paced.testing.distributed import CheckRecorder
from megatron_paced.utils import free_port

SEED = 1234
SEQ = 48
API_KEY = "test-key"
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15], [16, 17, 18, 19], [20, 21, 22]]


def check_log_probs(outputs, policy, cfg, ctx) -> None:
    batch = completions_to_batch(PROMPTS, outputs, SEQ)
    trainer = compute_log_probs(policy.model, batch, ctx, vocab_size=cfg.vocab_size,
                                micro_batch_size=batch.num_sequences)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(trainer.token_log_probs.cpu()[mask],
                               batch.rollout_log_probs[mask], rtol=1e-5, atol=1e-5)


def train_step(policy, cfg, ctx, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (4, 16), generator=gen)
    mask = torch.ones(4, 16)
    mask[:, :4] = 0
    policy.zero_grad()
    forward_backward(policy.model, SequenceBatch(tokens, mask), nll_loss, ctx,
                     vocab_size=cfg.vocab_size, micro_batch_size=4)
    policy.step()


@contextlib.contextmanager
def killed_after_first_generation(client, server):
    """Within: the server is killed right after the client's first /generate answer (the
    yielded list says whether it was)."""
    post, killed = client.post, []

    def post_then_kill(target, path, body=None, **kwargs):
        answer = post(target, path, body, **kwargs)
        if path == "/generate" and not killed:
            killed.append(True)
            server.process.kill()
            server.process.wait()
        return answer

    client.post = post_then_kill
    try:
        yield killed
    finally:
        client.post = post


def tokens(outputs) -> list:
    return [[c.token_ids for c in row] for row in outputs]


def check_pause_and_async(checks, client, server, policy, engine, cfg, ctx, sample,
                          greedy) -> None:
    """/pause_generation and /continue_generation; the asynchronous backend's order of
    generations and pushes, and a server killed under it."""
    from megatron_paced.rollout.async_rollout import AsyncSGLangBackend
    from megatron_paced.rollout.weight_sync import flush_cache

    def in_thread(function):
        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(value=function()), daemon=True)
        thread.start()
        return thread, box

    with checks.check("paused_server_holds_requests_until_continue"):
        client.post(server, "/pause_generation", {"mode": "retract"})
        thread, box = in_thread(lambda: client.generate(PROMPTS[:2], n=1, sampling=greedy,
                                                        seed=0))
        thread.join(0.5)
        assert thread.is_alive(), "a paused server generated"
        flush_cache(client, [server], timeout_s=5)  # the held request has not started
        client.post(server, "/continue_generation", {})
        thread.join(60)
        assert len(box["value"]) == 2
    with checks.check("abort_mode_answers_abort_and_the_client_asks_again"):
        client.post(server, "/pause_generation", {"mode": "abort"})
        aborted_before = client.num_aborted
        thread, box = in_thread(lambda: client.generate(PROMPTS, n=2, sampling=sample, seed=5))
        thread.join(0.5)
        assert thread.is_alive() and client.num_aborted > aborted_before
        client.post(server, "/continue_generation", {})
        thread.join(60)
        slots = sorted((c.prompt_index, c.sample_index) for row in box["value"] for c in row)
        assert slots == [(p, s) for p in range(len(PROMPTS)) for s in range(2)]
    backend = None
    async_client = SGLangClient([server], concurrency=2, prompts_per_request=2, timeout_s=120,
                                api_key=API_KEY,
                                on_restart=lambda s: backend.on_server_restart(s))
    backend = AsyncSGLangBackend(async_client, TensorTransport(async_client, cfg, ctx,
                                                               bucket_bytes=64 << 10,
                                                               keep_last=True),
                                 ctx, timeout_s=120)
    try:
        with checks.check("async_push_waits_for_the_generations_queued_before_it"):
            backend.sync_weights(policy.modules(), 10)
            before = engine.generate(PROMPTS, n=1, sampling=greedy, seed=0)
            first = backend.submit(PROMPTS, n=1, sampling=greedy, seed=0, min_version=10)
            train_step(policy, cfg, ctx, seed=7)
            backend.sync_weights(policy.modules(), 11)  # queued behind `first`
            second = backend.submit(PROMPTS, n=1, sampling=greedy, seed=0, min_version=11)
            after = engine.generate(PROMPTS, n=1, sampling=greedy, seed=0)
            old, new = first.result(), second.result()
            assert {c.weight_version for row in old for c in row} == {10}
            assert {c.weight_version for row in new for c in row} == {11}
            assert tokens(old) == tokens(before) and tokens(new) == tokens(after)
            assert tokens(before) != tokens(after)
        with checks.check("async_killed_server_is_given_its_weights_again"):
            with killed_after_first_generation(async_client, server) as killed:
                outputs = backend.submit(PROMPTS, n=4, sampling=sample, seed=12,
                                         min_version=11).result()
            assert killed and server.num_restarts == 2
            slots = sorted((c.prompt_index, c.sample_index) for row in outputs for c in row)
            assert slots == [(p, s) for p in range(len(PROMPTS)) for s in range(4)]
            assert {c.weight_version for row in outputs for c in row} == {11}
            check_log_probs(outputs, policy, cfg, ctx)  # the weights of version 11
    finally:
        backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    checks = CheckRecorder()
    ctx = initialize_parallel(ParallelConfig(), seed=SEED)
    # On a GPU the trainer's tensors are CUDA ones, so the tensor push goes as CUDA IPC handles.
    (args.out / "device.txt").write_text(ctx.device.type)
    cfg = PRESETS["tiny-llama"]
    policy = build_policy(cfg, OptimizerConfig(optimizer="sgd", lr=0.5, weight_decay=0.0,
                                               use_distributed_optimizer=False), ctx, seed=SEED)
    engine = EmbeddedEngine(policy.model, ctx, vocab_size=cfg.vocab_size, max_sequence_length=SEQ)
    server = ServerProcess(serve_command("--model", "tiny-llama", "--seed", str(SEED),
                                         "--max-sequence-length", str(SEQ)),
                           port=free_port(), startup_timeout_s=120, api_key=API_KEY,
                           log_path=str(args.out / "server.log"),
                           env={"OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())})
    server.start()
    client = SGLangClient([server], concurrency=2, prompts_per_request=2, timeout_s=120,
                          api_key=API_KEY)
    sample = SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=[3])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    try:
        with checks.check("server_log_probs_equal_trainer"):
            outputs = client.generate(PROMPTS, n=3, sampling=sample, seed=1)
            assert all(len(row) == 3 for row in outputs)
            assert len({tuple(c.token_ids) for c in outputs[0]}) > 1
            check_log_probs(outputs, policy, cfg, ctx)
        with checks.check("tempered_sampling_returns_the_policy_log_probs"):
            # SGLang returns log-probs of the temperature-scaled logits unless
            # SGLANG_RETURN_ORIGINAL_LOGPROB=1, which launched servers get (pi_old is the
            # temperature-1 policy).
            warm = SamplingParams(temperature=0.6, max_new_tokens=6, stop_token_ids=[3])
            check_log_probs(client.generate(PROMPTS, n=2, sampling=warm, seed=2), policy, cfg,
                            ctx)
        transports = {
            "disk": DiskTransport(client, cfg, ctx, directory=str(args.out / "weights"),
                                  bucket_bytes=64 << 10),
            "tensor": TensorTransport(client, cfg, ctx, bucket_bytes=64 << 10),
            # A broadcast over a weight-update group, on gloo: NCCL refuses two ranks on one
            # GPU, and this test's trainer and server share the machine's only device.
            "nccl": DistributedTransport(client, cfg, ctx, bucket_bytes=64 << 10,
                                         backend="gloo"),
        }
        for step, (name, transport) in enumerate(transports.items(), start=1):
            with checks.check(f"{name}_push_changes_outputs"):
                before = client.generate(PROMPTS, n=1, sampling=greedy, seed=0)
                train_step(policy, cfg, ctx, seed=step)
                transport.push(policy.modules()[0], version=f"v{step}")
                info = client.model_info(server)
                assert info["weight_version"] == f"v{step}", info
                after = client.generate(PROMPTS, n=1, sampling=greedy, seed=0)
                local = engine.generate(PROMPTS, n=1, sampling=greedy, seed=0)
                assert [r[0].token_ids for r in after] == [r[0].token_ids for r in local]
                assert [r[0].token_ids for r in after] != [r[0].token_ids for r in before]
                check_log_probs(client.generate(PROMPTS, n=2, sampling=sample, seed=3),
                                policy, cfg, ctx)
        with checks.check("killed_server_restarts_and_batch_completes"):
            sync = transports["nccl"]
            client.on_restart = lambda s: sync.on_server_restart(policy.modules()[0])
            with killed_after_first_generation(client, server) as killed:
                outputs = client.generate(PROMPTS, n=4, sampling=sample, seed=11)
            assert killed and server.num_restarts == 1 and client.num_retries >= 1
            slots = sorted((c.prompt_index, c.sample_index) for row in outputs for c in row)
            assert slots == [(p, s) for p in range(len(PROMPTS)) for s in range(4)]
            check_log_probs(outputs, policy, cfg, ctx)  # the restarted server got the weights
            assert client.model_info(server)["weight_version"] == "v3"
        with checks.check("weight_updates_need_the_api_key"):
            unauthenticated = SGLangClient([server], api_key=None, timeout_s=30)
            try:
                unauthenticated.post(server, "/update_weight_version", {"new_version": "x"})
                raise AssertionError("accepted a weight update without the API key")
            except urllib.error.HTTPError as err:
                assert err.code == 401
            assert client.model_info(server)["weight_version"] == "v3"
        with checks.check("distributed_updates_refuse_unknown_groups"):
            for path, body, message in (
                    ("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"],
                     "shapes": [[1]], "group_name": "never-formed"}, "no weight-update group"),
                    ("/init_weights_update_group", {"master_address": "127.0.0.1",
                     "master_port": 1, "rank_offset": 1, "world_size": 2, "backend": "nccl"},
                     "needs a GPU")):
                if "GPU" in message and ctx.device.type == "cuda":
                    continue
                try:
                    with weight_update_session(client, [server]):
                        client.post(server, path, body)
                    raise AssertionError(f"{path} accepted {body}")
                except urllib.error.HTTPError as err:
                    assert err.code == 400 and message in str(err), err
        with checks.check("release_and_resume_memory"):
            client.release_memory()
            try:
                client.generate(PROMPTS[:1], n=1, sampling=greedy, seed=0)
                raise AssertionError("generated while the memory was released")
            except Exception as err:  # noqa: BLE001 - the rejection is the point
                assert "released" in str(err), err
            client.resume_memory()
            assert len(client.generate(PROMPTS[:1], n=1, sampling=greedy, seed=0)) == 1
        check_pause_and_async(checks, client, server, policy, engine, cfg, ctx, sample, greedy)
    finally:
        client.close()
    checks.write(args.out / "checks.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
