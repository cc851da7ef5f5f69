"""
Tokens/s of fineweb.py against a plain single-process encode_ordinary loop over the same documents.

    python bench/bench_fineweb.py                       # Gutenberg jsonl from ../shared/data, --num_proc 2
    python bench/bench_fineweb.py --input some.jsonl --num_proc 8

The loop gets the documents already in memory and only encodes them; fineweb.py's time includes
reading and parsing the jsonl, starting its worker pool and writing the shards (not Python's startup
and imports, which are the same for both). The ratio is from the same run, on the same machine.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import fineweb  # noqa: E402
from train_gpt2 import get_tokenizer  # noqa: E402

GUTENBERG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                         "gutenberg", "gutenberg_books.jsonl")

p = argparse.ArgumentParser(description="fineweb.py tokens/s against a single-process encode_ordinary loop")
p.add_argument("--input", default=GUTENBERG, help="a .jsonl file with a 'text' field")
p.add_argument("--num_proc", type=int, default=2)
p.add_argument("--shard_size", type=int, default=10_000_000)
p.add_argument("--repeat", type=int, default=3, help="runs of each; the best time counts")
args = p.parse_args()
if not os.path.isfile(args.input):
    sys.exit(f"error: {args.input} does not exist; pass a .jsonl file with --input")

enc = get_tokenizer()
with open(args.input, "rb") as f:
    docs = [json.loads(line)["text"] for line in f if line.strip()]
print(f"{args.input}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M characters; "
      f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; best of {args.repeat}")


def encode_loop():
    tokens = 0
    for text in docs:
        tokens += len(enc.encode_ordinary(text)) + 1  # + the EOT, as in the shards
    return tokens


def fineweb_run(num_proc):
    with tempfile.TemporaryDirectory() as out:
        meta = fineweb.run(fineweb.parse_args(["--input", args.input, "--output_dir", out, "--prefix", "bench",
                                               "--shard_size", str(args.shard_size), "--num_proc", str(num_proc)]))
    return meta["tokens"]


runs = {"single-process encode_ordinary loop": encode_loop}
runs.update({f"fineweb.py --num_proc {n}": functools.partial(fineweb_run, n) for n in sorted({1, args.num_proc})})
best, counts = {name: float("inf") for name in runs}, set()
for _ in range(args.repeat):  # interleaved, so that a burst of load elsewhere hits every contender alike
    for name, fn in runs.items():
        t0 = time.perf_counter()
        counts.add(fn())
        best[name] = min(best[name], time.perf_counter() - t0)
assert len(counts) == 1, f"the loop and fineweb.py disagree on the token count: {counts}"
tokens = counts.pop()
loop_dt = best["single-process encode_ordinary loop"]
for name, dt in best.items():
    print(f"{name:38s} {tokens:,} tokens in {dt:5.2f} s = {tokens / dt:11,.0f} tokens/s = {loop_dt / dt:.2f}x the loop")
print(f"ratio fineweb.py --num_proc {args.num_proc} / single-process loop: "
      f"{loop_dt / best[f'fineweb.py --num_proc {args.num_proc}']:.2f}x (load average now {os.getloadavg()[0]:.2f})")
