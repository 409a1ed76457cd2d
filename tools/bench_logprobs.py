"""Benchmark: token log-probs from vocab-parallel logits vs gathering the vocabulary.

For N tokens and a vocabulary V split over tp ranks, a gathered ``log_softmax`` needs the
(N, V) logits on every rank (an all-gather of N x V x (tp-1)/tp values per rank) and saves an
(N, V) tensor for backward. ``vocab_parallel_log_probs`` communicates three (N,) vectors
and saves an (N, V/tp) tensor. This script times forward+backward of both on one process
(tp = 1: the arithmetic alone) and prints, per TP size, the bytes each keeps and sends.

    python tools/bench_logprobs.py --tokens 2048 --vocab 49152 151936
"""

from __future__ import annotations

import statistics
import time

import torch

from megatron_paced.config import FlagParser, description
from megatron_paced.logprobs import vocab_parallel_log_probs


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = FlagParser(description=description(__doc__))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, {args.tokens} tokens, fp32, forward+backward, median of "
          f"{args.repeats}")
    print(f"{'vocab':>8} {'ours ms':>9} {'log_softmax ms':>15} {'max |diff|':>11}")
    for vocab in args.vocab:
        logits = torch.randn(args.tokens, vocab, device=device)
        targets = torch.randint(0, vocab, (args.tokens,), device=device)

        def ours():
            x = logits.detach().requires_grad_(True)
            vocab_parallel_log_probs(x, targets, tp_group=None, vocab_start=0,
                                     vocab_size=vocab).sum().backward()

        def gathered():
            x = logits.detach().requires_grad_(True)
            torch.log_softmax(x, -1).gather(-1, targets[:, None]).sum().backward()

        diff = (vocab_parallel_log_probs(logits, targets, tp_group=None, vocab_start=0,
                                         vocab_size=vocab)
                - torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]).abs().max()
        print(f"{vocab:>8} {_time_ms(ours, args.repeats):>9.1f} "
              f"{_time_ms(gathered, args.repeats):>15.1f} {float(diff):>11.1e}")
    print(f"\nper rank, {args.tokens} tokens, fp32 (MiB)")
    print(f"{'vocab':>8} {'tp':>3} {'saved: ours':>12} {'saved: gather':>14} "
          f"{'sent: ours':>11} {'sent: gather':>13}")
    for vocab in args.vocab:
        for tp in args.tp:
            mib = 4 / 2**20
            print(f"{vocab:>8} {tp:>3} {args.tokens * vocab / tp * mib:>12.1f} "
                  f"{args.tokens * vocab * mib:>14.1f} {3 * args.tokens * mib:>11.3f} "
                  f"{args.tokens * vocab * (tp - 1) / tp * mib:>13.1f}")


if __name__ == "__main__":
    main()
