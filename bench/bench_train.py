"""
Training speed on one GPU, in one run: the pure model step against train_gpt2.py's real loop, and the levers
on the model step. Prints figures, asserts nothing.

    python bench/bench_train.py                        # GPU: GPT-2 124M, B=64, T=1024, 524,288 tokens/step
    python bench/bench_train.py --device cpu --tiny    # the same measurements with a tiny model (a smoke run)

model step  random tokens already on the device; per step accum x (forward, backward) under bf16 autocast,
            grad clip, fused AdamW, one host sync: the ceiling the loop can reach. Variants, each compiled here:
              flash   scaled_dot_product_attention as PyTorch picks it (flash attention on an H100/H200)
              cudnn   the same with cuDNN's attention put first (traced that way: the compiled graph keeps it)
              cudagraphs  torch.compile(mode="reduce-overhead") (not in the default list: launch overhead is
                      ~0 at 64x1024 tokens per micro-step)
            timed interleaved (A B A B ...) so a drifting clock hits all alike; from the same init on the same
            batches, so their losses show that the math is the same.
loop        python train_gpt2.py on fineweb.py shards of input.txt, the steady steps' median; ratio = loop tok/s
            over the flash model step's.
val compile the first validation pass after training compiled: on the training graph, as train_gpt2.py does,
            against eval mode + no_grad, which compiles a second graph.

MFU = tok/s * FLOPs per token / peak dense bf16 FLOP/s (train_gpt2.PEAK_BF16_FLOPS), FLOPs per token =
6N + 12*L*H*Q*T (PaLM, appendix B; 0.855 GFLOP for 124M at T=1024).
"""
import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_gpt2 import (GPT, GPTConfig, accumulate_gradients, configure_optimizer, flops_per_token,  # noqa: E402
                        peak_flops, resolve_device)

CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]
SIZES = {"gpt2": dict(model=GPTConfig(), B=64, T=1024, total=524288),
         "tiny": dict(model=GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64), B=4, T=64, total=1024)}


def attention_kernels(fn):
    """Names of the attention kernels that one call of fn runs (from the profiler)."""
    with torch.profiler.profile() as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if re.search(r"flash|cudnn|fmha|attention|sdpa", n, re.I))[:4]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variants", default="flash,cudnn", help="model-step variants: flash,cudnn,cudagraphs")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loop_steps", type=int, default=12)
    parser.add_argument("--no-loop", dest="loop", action="store_false")
    parser.add_argument("--no-val", dest="val", action="store_false")
    args = parser.parse_args()
    device = resolve_device(args.device)
    size = SIZES["tiny" if args.tiny else "gpt2"]
    B, T, total = size["B"], size["T"], size["total"]
    accum = total // (B * T)
    cuda = device.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{name}, torch {torch.__version__}, {'tiny' if args.tiny else 'GPT-2 124M'}: B={B} T={T} accum={accum} "
          f"({total:,} tokens/step)", flush=True)

    torch.manual_seed(0)
    init = GPT(size["model"]).state_dict()
    flops = flops_per_token(GPT(size["model"]), T) * total
    gen = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 50257, (accum, B, T), generator=gen).to(device)
    ys = torch.randint(0, 50257, (accum, B, T), generator=gen).to(device)

    variants = {}
    for v in args.variants.split(","):
        raw = GPT(size["model"]).to(device)
        raw.load_state_dict(init)
        compiled = torch.compile(raw, mode="reduce-overhead" if v == "cudagraphs" else None, fullgraph=True)
        opt = configure_optimizer(raw, 0.1, 6e-4, device.type)
        ctx = (lambda: sdpa_kernel(CUDNN_FIRST, set_priority=True)) if v == "cudnn" else contextlib.nullcontext

        def step(compiled=compiled, raw=raw, opt=opt, ctx=ctx):
            opt.zero_grad(set_to_none=True)
            with ctx():
                loss = accumulate_gradients(compiled, list(zip(xs, ys)), autocast, ddp=False)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            opt.step()
            return loss.item()  # the one host sync, as in the loop

        t0 = time.time()
        losses = [step()]  # compiles
        variants[v] = dict(step=step, compiled=compiled, ctx=ctx, times=[], losses=losses,
                           compile_s=time.time() - t0)
        print(f"compiled {v} in {variants[v]['compile_s']:.0f} s", flush=True)

    for _ in range(args.rounds):
        for v in variants.values():
            v["losses"].append(v["step"]())  # warm-up after the switch from the other variant
            for _ in range(args.steps):
                t0 = time.time()
                v["losses"].append(v["step"]())
                v["times"].append(time.time() - t0)

    print(f"\n{'model step':12s} {'ms/step':>8s} {'spread':>12s} {'tok/s':>11s} {'MFU':>6s}  attention kernels")
    for k, v in variants.items():
        ms = statistics.median(v["times"]) * 1000
        mfu = f"{flops / (ms / 1000) / peak * 100:5.1f}%" if peak else "   n/a"
        with v["ctx"]():
            kernels = attention_kernels(lambda: v["compiled"](xs[0], ys[0])[1].backward())
        print(f"{k:12s} {ms:8.1f} {min(v['times']) * 1000:5.0f}-{max(v['times']) * 1000:<6.0f} "
              f"{total / ms * 1000:11,.0f} {mfu}  {', '.join(kernels) or '-'}", flush=True)
    base = variants.get("flash")
    for k, v in variants.items():
        if base and v is not base:
            n = min(len(v["losses"]), len(base["losses"]))
            diff = max(abs(a - b) for a, b in zip(v["losses"][:n], base["losses"][:n]))
            speed = statistics.median(base["times"]) / statistics.median(v["times"])
            print(f"{k} vs flash: {speed:.3f}x the speed; losses over the same {n} steps from the same init: "
                  f"max |diff| {diff:.2g} (losses {base['losses'][0]:.3f} -> {base['losses'][n - 1]:.3f})")

    if args.val and base:
        x, y = xs[0], ys[0]
        t0 = time.time()
        with autocast:
            base["compiled"](x, y)[1].detach().item()  # the training graph, autograd on: no compile
        train_graph = time.time() - t0
        base["compiled"].eval()
        t0 = time.time()
        with torch.no_grad(), autocast:
            base["compiled"](x, y)[1].item()  # eval mode and no_grad: a second graph to compile
        eval_graph = time.time() - t0
        base["compiled"].train()
        print(f"first val batch after training compiled: {train_graph:.2f} s on the training graph, "
              f"{eval_graph:.2f} s in eval + no_grad (a second compile)", flush=True)

    if args.loop:
        work = tempfile.mkdtemp(prefix="bench_train_")
        shards = os.path.join(work, "shards")
        subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), "--input", os.path.join(ROOT, "input.txt"),
                        "--output_dir", shards, "--shard_size", "100000"], check=True, capture_output=True)
        m = size["model"]
        cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data", shards, "--device", str(device),
               "--n_layer", str(m.n_layer), "--n_head", str(m.n_head), "--n_embd", str(m.n_embd),
               "--block_size", str(m.block_size), "--batch_size", str(B), "--seq_len", str(T),
               "--total_batch_size", str(total), "--max_steps", str(args.loop_steps), "--warmup_steps", "2",
               "--eval_interval", "100000", "--val_tokens", str(B * T), "--sample_interval", "100000",
               "--checkpoint_interval", "100000", "--no-hellaswag", "--compile", "--log_dir", os.path.join(work, "log")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        rows = [(int(s), float(ms)) for s, ms in re.findall(r"step +(\d+) \|.*\| (\d+) ms \|", r.stdout)]
        steady = [ms for s, ms in rows if s >= 2]
        if r.returncode or not steady:
            print(f"loop failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        else:
            ms = statistics.median(steady)
            mfu = f", MFU {flops / (ms / 1000) / peak * 100:.1f}%" if peak else ""
            line = (f"\nloop (train_gpt2.py, steps 2-{args.loop_steps - 1}): {ms:.0f} ms/step "
                    f"[{min(steady):.0f}-{max(steady):.0f}], {total / ms * 1000:,.0f} tok/s{mfu}")
            if base:
                line += f"; loop / model step = {statistics.median(base['times']) * 1000 / ms:.3f}"
            print(line)


if __name__ == "__main__":
    main()
