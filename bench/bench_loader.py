"""
Milliseconds of Python to cut one rank's sequences of a training step (DataLoader.step_batches, as the
prefetch thread runs it), with the shard already in memory: the loader cuts a step's sequences with numpy,
against the sequence-at-a-time loop it replaced (kept here only to compare).

    python bench/bench_loader.py                       # 99 shards of 100M tokens (FineWeb-Edu 10B), T=1024
    python bench/bench_loader.py --shard_tokens 10_000_000 --repeats 500

The 99 shards are views of one random token array (a document every ~1,000 tokens), so they take the memory
of one; the loader shuffles its own copy of each shard it reads, as in training. Figures are the median of
--repeats calls, old and new interleaved so that load from other work on the machine hits both alike.

On CUDA the step's outputs are pinned, from torch's caching host allocator, which reuses them. Here glibc's
malloc may hand each call fresh pages instead (its heap trimmed after the last call's outputs were freed), a
page fault per 4 KiB written: ~4 ms for the 8 MiB of 512 sequences, on either loader, in some runs and not
others. So the benchmark keeps malloc from giving freed memory back, and prints the page faults per call.
"""

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch  # noqa: E402
from devices import keep_freed_memory  # noqa: E402
from train_gpt2 import EOT, DataLoader  # noqa: E402


class SequenceAtATime(DataLoader):
    """The loader before its sequences were vectorized: the epoch's shard order and its cumulative sums made
    again for every sequence, and the sequences copied one by one."""

    def sequence(self, q):
        epoch, q = divmod(q, self.seqs_per_epoch)
        order = self._shard_order(epoch)
        bounds = np.cumsum(self.seqs_per_shard[order])
        i = int(np.searchsorted(bounds, q, side="right"))
        start = (q - (bounds[i - 1] if i else 0)) * self.T
        return self._tokens(epoch, int(order[i]))[start:start + self.T + 1]

    def step_batches(self, step, accum, rank, world, B, pin_memory=False):
        x, y = (torch.empty((accum, B, self.T), dtype=torch.long, pin_memory=pin_memory) for _ in range(2))
        xs, ys = x.numpy(), y.numpy()
        for micro in range(accum):
            q = ((step * accum + micro) * world + rank) * B
            for b in range(B):
                seq = self.sequence(q + b)
                xs[micro, b], ys[micro, b] = seq[:-1], seq[1:]
        return x, y


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                    platform.processor() or "unknown CPU")


p = argparse.ArgumentParser(description="ms to cut one rank's sequences of a step, old loop vs numpy")
p.add_argument("--shards", type=int, default=99)
p.add_argument("--shard_tokens", type=int, default=100_000_000)
p.add_argument("--seq_len", type=int, default=1024)
p.add_argument("--repeats", type=int, default=200, help="calls of each; the median counts")
args = p.parse_args()

keep_freed_memory()  # as a CPU run does: freed memory stays in the heap (glibc only)

rng = np.random.default_rng(0)
tokens = rng.integers(0, EOT, args.shard_tokens, dtype=np.uint16)
tokens[rng.choice(args.shard_tokens, args.shard_tokens // 1000, replace=False)] = EOT
shards = [tokens] * args.shards
T = args.seq_len
print(f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
      f"{datetime.date.today()}; numpy {np.__version__}, torch {torch.__version__}")
print(f"measured: ms of step_batches to cut one rank's sequences of a step, its shard already in memory; "
      f"{args.shards} shards of {args.shard_tokens:,} tokens, T={T}, shuffle on; median of {args.repeats} "
      f"calls, before and now interleaved; outputs unpinned (a CPU build)")

loaders = {"before": SequenceAtATime(shards, T, 50304), "now": DataLoader(shards, T, 50304)}
# (accum, world, B): a rank of 8 H100s, and one GPU accumulating the same 524,288-token step
for accum, world, B in [(1, 8, 64), (8, 1, 64)]:
    step = 3  # its sequences lie in the epoch's first shard, read into memory by the warm-up call below
    batches = [loader.step_batches(step, accum, 0, world, B) for loader in loaders.values()]
    assert all(torch.equal(a, b) for a, b in zip(*batches)), "the two loaders disagree"
    times, faults = {name: [] for name in loaders}, {name: [] for name in loaders}
    for _ in range(args.repeats):  # interleaved
        for name, loader in loaders.items():
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            loader.step_batches(step, accum, 0, world, B)
            times[name].append(1000 * (time.perf_counter() - t0))
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(f"{accum * B} sequences (accum {accum}, world {world}, B {B}): "
          + ", ".join(f"{name} {ms[name]:.3f} ms ({statistics.median(faults[name]):.0f} page faults)"
                      for name in loaders) + f"; {ms['before'] / ms['now']:.1f}x")
print(f"load average now {os.getloadavg()[0]:.2f}")
