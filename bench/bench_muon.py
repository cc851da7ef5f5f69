"""
AdamW against Muon (train_gpt2.py --optimizer muon) at equal tokens, on the same model and data: the final
val loss of each, the tokens each needs to reach AdamW's final val loss, and ms per training step.

    python bench/bench_muon.py     # smoke: 30 steps at the README's best lrs, 1.5 min on an idle 2-core CPU
    python bench/bench_muon.py --steps 100 --adamw_lrs 1e-3,2e-3,4e-3,8e-3 --muon_lrs 4e-3,8e-3,1.6e-2 \\
        --fused_lrs 8e-3 --jobs 4 --timing_reps 10 --timing_widths 128,256 --plot bench/muon_vs_adamw.png

Every run: 4 layers, 4 heads, width 128, T=256, 2048 tokens a step, warmup over the first 10% of the
steps, then cosine to 0.1x; val loss every steps/10 steps on the same 8192 val tokens: 32 sequences
spread evenly through fineweb.py's val shard (see spread_val). A Muon run's lr sets both --max_lr
(AdamW's embeddings, head, biases, gains) and --muon_lr. --fused_lrs adds Muon runs with the c_attn
matrix orthogonalised whole (--no-muon_split_qkv) instead of as q, k and v apart. The data is fineweb.py's
shards of the Gutenberg stand-in (or input.txt, or --data FOLDER_OR_TXT). The table asserts nothing.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GUTENBERG = os.path.join(ROOT, "..", "shared", "data", "gutenberg", "gutenberg_books.jsonl")
MODEL = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "256", "--seq_len", "256",
         "--batch_size", "8", "--total_batch_size", "2048"]
TOKENS_PER_STEP = 2048


def start_run(name, optimizer, lr, split, args, data, work, threads):
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), *MODEL, "--data", data, "--device", "cpu",
           "--optimizer", optimizer, "--max_lr", str(lr), "--max_steps", str(args.steps),
           "--warmup_steps", str(max(1, args.steps // 10)), "--eval_interval", str(max(1, args.steps // 10)),
           "--val_tokens", "8192",
           "--no-hellaswag", "--sample_interval", "100000", "--checkpoint_interval", "100000",
           "--log_dir", os.path.join(work, name)]
    if optimizer == "muon":
        cmd += ["--muon_lr", str(lr), "--muon_split_qkv" if split else "--no-muon_split_qkv"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = open(os.path.join(work, name + ".out"), "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def finish_run(name, optimizer, lr, split, work):
    text = open(os.path.join(work, name + ".out")).read()
    rows = [line.split() for line in open(os.path.join(work, name, "log.txt"))]
    val = {int(step): float(value) for step, stream, value in rows if stream == "val"}
    ms = [float(m) for m in re.findall(r"\| (\d+) ms \|", text)][2:]  # skip the allocator's warm-up
    return dict(name=name, optimizer=optimizer, lr=lr, split=split, val=val, final=val[max(val)],
                ms=statistics.median(ms))


def spread_val(shards, work, n_seqs=32, T=256):
    """A folder with the same train shards and a val shard of n_seqs sequences spaced evenly through
    fineweb.py's val shard: the val loss then averages over all its books, not the first few pages of one."""
    import numpy as np
    folder = os.path.join(work, "spread")
    os.makedirs(folder)
    for name in os.listdir(shards):
        if "_train_" in name:
            os.symlink(os.path.abspath(os.path.join(shards, name)), os.path.join(folder, name))
    val = np.load(next(os.path.join(shards, n) for n in sorted(os.listdir(shards)) if "_val_" in n))
    starts = np.linspace(0, len(val) - T - 1, n_seqs).astype(int)
    np.save(os.path.join(folder, "spread_val_000000.npy"), np.concatenate([val[s:s + T + 1] for s in starts]))
    return folder


def tokens_to(val, target):
    """Tokens at which the val curve first reaches target, interpolating linearly between evals."""
    steps = sorted(val)
    if val[steps[0]] <= target:
        return steps[0] * TOKENS_PER_STEP
    for s0, s1 in zip(steps, steps[1:]):
        if val[s1] <= target:
            frac = (val[s0] - target) / (val[s0] - val[s1])
            return (s0 + frac * (s1 - s0)) * TOKENS_PER_STEP
    return None


def run_all(configs, args, data, work):
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    pending, running, results = list(configs), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            cfg = pending.pop(0)
            running.append((cfg, start_run(*cfg, args, data, work, threads)))
        time.sleep(1)
        for cfg, proc in list(running):
            if proc.poll() is not None:
                running.remove((cfg, proc))
                if proc.returncode:
                    tail = open(os.path.join(work, cfg[0] + ".out")).read().strip().splitlines()[-1:]
                    print(f"{cfg[0]} failed: {tail}", flush=True)
                    continue
                results.append(finish_run(*cfg, work))
                r = results[-1]
                print(f"done {r['name']}: final val {r['final']:.4f}, {r['ms']:.0f} ms/step", flush=True)
    return results


def time_steps(width, reps, threads):
    """Median ms of one training step (forward, backward, clip, optimizer step) of each optimizer and of
    its optimizer step alone, in one process and alternating, so both see the same load."""
    sys.path.insert(0, ROOT)
    import torch
    import devices
    import train_gpt2
    torch.set_num_threads(threads)
    devices.keep_freed_memory()
    cfg = train_gpt2.GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=width)
    x, y = torch.randint(0, train_gpt2.GPT2_VOCAB, (2, 8, 256))
    runs = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        model = train_gpt2.GPT(cfg)
        runs[name] = model, train_gpt2.configure_optimizer(model, 0.1, 4e-3, "cpu", name), [], []
    for i in range(reps + 2):
        for name in (("adamw", "muon") if i % 2 else ("muon", "adamw")):
            model, opt, steps, opt_steps = runs[name]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(x, y)[1].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= 2:  # the first two: allocator warm-up
                steps.append(t2 - t0)
                opt_steps.append(t2 - t1)
    return {name: (statistics.median(s) * 1000, statistics.median(o) * 1000) for name, (_, _, s, o) in runs.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--adamw_lrs", default="2e-3")
    parser.add_argument("--muon_lrs", default="1.6e-2")
    parser.add_argument("--fused_lrs", default="", help="Muon runs with c_attn orthogonalised whole, at these lrs")
    parser.add_argument("--timing_reps", type=int, default=5, help="alternating timed steps of each optimizer")
    parser.add_argument("--timing_threads", type=int, default=1, help="1: no thread waits on a busy shared CPU")
    parser.add_argument("--timing_widths", default="128", help="model widths to time (the runs use 128)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each gets cpu_count / jobs threads)")
    parser.add_argument("--plot", default=None, help="write the val curves of the best runs to this PNG")
    parser.add_argument("--json", default=None, help="write every run's val curve and ms/step here")
    args = parser.parse_args()
    work = tempfile.mkdtemp()
    data = args.data
    if data is None:
        data = os.path.join(work, "shards")
        src = GUTENBERG if os.path.exists(GUTENBERG) else os.path.join(ROOT, "input.txt")
        subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), "--input", src, "--output_dir", data,
                        "--shard_size", "2000000"], check=True, stdout=subprocess.DEVNULL)
    if os.path.isdir(data):
        data = spread_val(data, work)
    adamw_lrs = [float(x) for x in args.adamw_lrs.split(",")]
    muon_lrs = [float(x) for x in args.muon_lrs.split(",")]
    # AdamW and Muon runs alternate, so runs that share the CPU are one of each
    configs = []
    for i in range(max(len(adamw_lrs), len(muon_lrs))):
        configs += [("adamw", "adamw", adamw_lrs[i], None)] if i < len(adamw_lrs) else []
        configs += [("muon", "muon", muon_lrs[i], True)] if i < len(muon_lrs) else []
    configs += [("muon", "muon", float(lr), False) for lr in args.fused_lrs.split(",") if lr]
    configs = [(f"{opt}_{lr:g}" + {True: "_split", False: "_fused"}.get(split, ""), opt, lr, split)
               for _, opt, lr, split in configs]
    results = run_all(configs, args, data, work)
    best_muon = min((r for r in results if r["split"]), key=lambda r: r["final"])

    adamw = min((r for r in results if r["optimizer"] == "adamw"), key=lambda r: r["final"])
    target = adamw["final"]
    print(f"\n{args.steps} steps x {TOKENS_PER_STEP} tokens; target = best AdamW's final val loss {target:.4f}")
    print(f"{'run':<22} {'final val':>9} {'tokens to target':>17} {'vs AdamW':>8} {'ms/step':>8}")
    for r in results:
        tok = tokens_to(r["val"], target)
        ratio = f"{tok / tokens_to(adamw['val'], target):7.0%}" if tok else "     -"
        tok = f"{tok:,.0f}" if tok else "not reached"
        print(f"{r['name']:<22} {r['final']:9.4f} {tok:>17} {ratio:>8} {r['ms']:8.0f}")
    print(f"\nms per training step of 2048 tokens (4 layers, T=256; {args.timing_threads} thread(s)), median of "
          f"{args.timing_reps} alternating steps of each; in brackets the optimizer step alone")
    print(f"{'width':>5} {'AdamW':>12} {'Muon':>12} {'Muon/AdamW':>10}")
    timing = {}
    for width in map(int, args.timing_widths.split(",")):
        t = timing[width] = time_steps(width, args.timing_reps, args.timing_threads)
        print(f"{width:>5} {t['adamw'][0]:6.0f} ({t['adamw'][1]:3.0f}) {t['muon'][0]:6.0f} ({t['muon'][1]:3.0f}) "
              f"{t['muon'][0] / t['adamw'][0]:10.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, tokens_per_step=TOKENS_PER_STEP, target=target, runs=results,
                           timing=timing), f, indent=1)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        best = [adamw, best_muon] + [r for r in results if r["split"] is False and r["lr"] == best_muon["lr"]]
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for r in best:
            steps = sorted(r["val"])
            label = f"{r['optimizer']} lr {r['lr']:g}" + {True: " (q,k,v apart)", False: " (c_attn whole)"}.get(r["split"], "")
            ax.plot([s * TOKENS_PER_STEP / 1e3 for s in steps], [r["val"][s] for s in steps], label=label)
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("val loss")
        ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
        ax.legend()
        ax.set_title("4L-128 GPT-2, Gutenberg, 2-core AMD EPYC VM, 2026-11-28", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
