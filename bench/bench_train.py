"""
Training throughput of train_gpt2.py: tok/s and MFU for each micro-batch size, compile on and off.

    python bench/bench_train.py                       # GPU: 124M, T=1024, B=16 and 64, 30 steps each
    python bench/bench_train.py --device cpu --batch_sizes 4 --seq_len 256 --steps 5 --n_layer 2

MFU = tok/s * FLOPs per token / peak bf16 FLOP/s, FLOPs per token = 6N + 12*L*H*Q*T (see train_gpt2.py).
The data is a 10M-token shard made by fineweb.py from the Gutenberg stand-in (or --data FOLDER_OR_TXT).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GUTENBERG = os.path.join(ROOT, "..", "shared", "data", "gutenberg", "gutenberg_books.jsonl")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", default=None)
    parser.add_argument("--batch_sizes", default="16,64")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--total_batch_size", type=int, default=524288)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--compile", default="on,off")
    args = parser.parse_args()
    work = tempfile.mkdtemp()
    data = args.data
    if data is None:
        data = os.path.join(work, "shards")
        src = GUTENBERG if os.path.exists(GUTENBERG) else os.path.join(ROOT, "input.txt")
        subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), "--input", src, "--output_dir", data,
                        "--shard_size", "10000000"], check=True)
    print(f"{'B':>4} {'compile':>7} {'ms/step':>9} {'tok/s':>11} {'MFU':>6}")
    for B in map(int, args.batch_sizes.split(",")):
        for comp in args.compile.split(","):
            total = max(args.total_batch_size // (B * args.seq_len), 1) * B * args.seq_len
            cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data", data, "--device", args.device,
                   "--batch_size", str(B), "--seq_len", str(args.seq_len), "--total_batch_size", str(total),
                   "--max_steps", str(args.steps), "--eval_interval", "100000", "--val_tokens", str(args.seq_len),
                   "--sample_interval", "100000", "--checkpoint_interval", "100000", "--no-hellaswag",
                   "--n_layer", str(args.n_layer), f"--{'' if comp == 'on' else 'no-'}compile",
                   "--log_dir", os.path.join(work, f"log_{B}_{comp}")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                print(f"{B:>4} {comp:>7} failed: {r.stderr.strip().splitlines()[-1]}")
                continue
            # skip the first steps (compilation, allocator warm-up) and average the rest
            rows = re.findall(r"\| (\d+) ms \| ([\d,]+) tok/s(?: \| MFU ([\d.]+)%)?", r.stdout)[min(5, args.steps // 2):]
            ms = sum(float(m) for m, _, _ in rows) / len(rows)
            tok = sum(float(t.replace(",", "")) for _, t, _ in rows) / len(rows)
            mfu = f"{sum(float(u) for _, _, u in rows) / len(rows):5.1f}%" if rows[0][2] else "   n/a"
            print(f"{B:>4} {comp:>7} {ms:9.0f} {tok:11,.0f} {mfu}", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
