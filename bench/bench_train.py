"""
Training speed on one GPU, in one run: the pure model step against train_gpt2.py's real loop, the levers on the
model step, and where a step's time goes. Prints figures, asserts nothing.

    python bench/bench_train.py                        # GPU: GPT-2 124M, B=64, T=1024, 524,288 tokens/step
    python bench/bench_train.py --device cpu --tiny    # the same measurements with a tiny model (a smoke run)

model step  random tokens already on the device; per step accum x (forward, backward) under bf16 autocast,
            grad clip, fused AdamW, one host sync: the ceiling the loop can reach. Variants, each compiled here
            with fullgraph=True from the same init:
              flash    train_gpt2.GPT as it is: scaled_dot_product_attention as PyTorch picks it (flash on Hopper)
              cudnn    cuDNN's attention put first, inside the compiled function, so that the graph is traced
                       (and cached) with it
              fusedce  the loss by FusedLinearCrossEntropy below: the 50,304-way logits never exist whole
              cudnn+fusedce  both (not in the default list: one more compile, ~1 min on a GPU)
              cudagraphs  torch.compile(mode="reduce-overhead") (not in the default list: launch overhead is
                       ~0 at 64x1024 tokens per micro-step)
            timed interleaved (A B A B ...) so a drifting clock hits all alike, on the same batches, so their
            losses show that the math is the same; each variant's peak memory; then one profiled step of each:
            GPU time by kind of kernel, and the five slowest kernels of the first.
val compile the first validation pass after training compiled: on the training graph, as train_gpt2.py does,
            against eval mode + no_grad, which compiles a second graph.
loop        python train_gpt2.py on fineweb.py shards of input.txt, the steady steps' median, run after this
            process gave its GPU memory back; ratio = loop tok/s over the flash model step's.

MFU = tok/s * FLOPs per token / peak dense bf16 FLOP/s (devices.PEAK_FLOPS), FLOPs per token =
6N + 12*L*H*Q*T (PaLM, appendix B; 0.855 GFLOP for 124M at T=1024).
"""
import argparse
import contextlib
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from devices import keep_freed_memory, peak_flops, resolve_device  # noqa: E402
from train_gpt2 import GPT, GPTConfig, accumulate_gradients, configure_optimizer, flops_per_token  # noqa: E402

CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]
SIZES = {"gpt2": dict(model=GPTConfig(), B=64, T=1024, total=524288),
         "tiny": dict(model=GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64), B=4, T=64, total=1024)}
# kernel (GPU) or aten op (CPU) names by kind; the first match counts. Inductor names its kernels after the ops
# it fused, e.g. triton_red_fused__log_softmax__to_copy_0.
KINDS = [("attention", r"flash|fmha|cudnn|attention|sdpa"),
         ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|aten::(mm|addmm|bmm|matmul|linear)\b"),
         ("cross-entropy", r"softmax|nll|cross_entropy|logsumexp|exp\b|scatter|gather"),
         ("layernorm", r"layer_norm|layernorm|var_mean"),
         ("gelu", r"gelu|tanh"),
         ("optimizer+clip", r"adam|foreach|multi_tensor|norm"),
         ("copy/fill", r"copy|memcpy|memset|fill|cat\b|zero")]


class FusedLinearCrossEntropy(torch.autograd.Function):
    """
    mean cross-entropy of h @ w.T (N, V) against targets (N,), targets -1 ignored, n_chunks rows at a time. Each
    chunk's logits live only while its gradients for h and w are computed, in the forward, so the whole (N, V)
    logits (6.6 GB in bf16 for 64 x 1024 tokens and 50,304 classes, twice that in fp32) are never held, and the
    backward only scales the stored gradients. The idea of Liger-Kernel's fused linear cross-entropy (Hsu et al.
    2024) in plain PyTorch ops for torch.compile to fuse; under autocast its matmuls run in bf16 like lm_head's.
    """

    @staticmethod
    def forward(ctx, h, w, targets, n_chunks):
        valid = targets != -1
        n = valid.sum().clamp_min(1)
        tgt = targets.clamp_min(0)[:, None]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grads_h, grad_w = [], torch.zeros_like(w, dtype=torch.float32)
        for hc, tc, vc in zip(h.chunk(n_chunks), tgt.chunk(n_chunks), valid.chunk(n_chunks)):
            logits = (hc @ w.t()).float()  # (rows, V)
            lse = torch.logsumexp(logits, dim=-1)
            loss = loss + ((lse - logits.gather(1, tc).squeeze(1)) * vc).sum()
            # d(mean loss)/d(logits) = (softmax - one-hot of the target) / n, on the rows that count
            g = torch.exp(logits - lse[:, None]).scatter_add(1, tc, torch.full(tc.shape, -1.0, device=h.device))
            g = g * (vc / n)[:, None]
            grads_h.append(g @ w)
            grad_w = grad_w + (g.t() @ hc).float()
        ctx.save_for_backward(torch.cat(grads_h).to(h.dtype), grad_w.to(w.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None


def fused_ce_forward(model, n_chunks):
    """model's forward for training (idx and targets given), with FusedLinearCrossEntropy for lm_head + the loss."""
    def forward(idx, targets):
        B, T = idx.size()
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T, device=idx.device))
        for block in model.transformer.h:
            x = block(x)
        h = model.transformer.ln_f(x).view(B * T, -1)
        return None, FusedLinearCrossEntropy.apply(h, model.lm_head.weight, targets.reshape(-1), n_chunks)
    return forward


def cudnn_first(fn):
    def forward(idx, targets):
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):  # traced into the graph: dynamo keeps the context
            return fn(idx, targets)
    return forward


def time_by_kind(fn, cuda):
    """Run fn once under the profiler; returns ({kind: ms}, [(ms, kernel name)] slowest first)."""
    with torch.profiler.profile() as prof:
        fn()
    per_kernel = []
    for e in prof.key_averages():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel.append((e.self_device_time_total / 1000, e.key))
        elif not cuda and e.key.startswith("aten::"):
            per_kernel.append((e.self_cpu_time_total / 1000, e.key))
    kinds = defaultdict(float)
    for ms, name in per_kernel:
        kinds[next((k for k, pattern in KINDS if re.search(pattern, name, re.I)), "other")] += ms
    return kinds, sorted(per_kernel, reverse=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variants", default="flash,cudnn,fusedce",
                        help="model-step variants: flash,cudnn,fusedce,cudnn+fusedce,cudagraphs")
    parser.add_argument("--ce_chunks", type=int, default=8, help="row chunks per micro-batch for fusedce")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each variant runs 1 + rounds x (1 + steps) steps: 22, so its losses are compared over >= 20")
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
    else:
        keep_freed_memory()  # as train_gpt2.py does on a CPU, or the loop would beat the model step here
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    peak = peak_flops(device, "bfloat16")  # the bf16 autocast above
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
        fn = fused_ce_forward(raw, args.ce_chunks) if "fusedce" in v else raw
        fn = cudnn_first(fn) if "cudnn" in v else fn
        compiled = torch.compile(fn, mode="reduce-overhead" if v == "cudagraphs" else None, fullgraph=True)
        opt = configure_optimizer(raw, 0.1, 6e-4, device.type)

        def step(compiled=compiled, raw=raw, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = accumulate_gradients(compiled, list(zip(xs, ys)), autocast)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            opt.step()
            return loss.item()  # the one host sync, as in the loop

        t0 = time.time()
        try:
            losses = [step()]  # compiles
        except Exception as e:  # one lever that does not build here must not cost the others' figures
            print(f"{v}: failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", flush=True)
            continue
        variants[v] = dict(step=step, compiled=compiled, times=[], losses=losses, compile_s=time.time() - t0)
        print(f"compiled {v} in {variants[v]['compile_s']:.0f} s", flush=True)

    for r in range(args.rounds):
        for v in variants.values():
            if cuda and r == 0:
                torch.cuda.reset_peak_memory_stats(device)
            v["losses"].append(v["step"]())  # warm-up after the switch from the other variant
            if cuda and r == 0:
                v["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            for _ in range(args.steps):
                t0 = time.time()
                v["losses"].append(v["step"]())
                v["times"].append(time.time() - t0)

    print(f"\n{'model step':14s} {'ms/step':>8s} {'spread':>12s} {'tok/s':>11s} {'MFU':>6s} {'peak mem':>9s}  "
          f"compile")
    for k, v in variants.items():
        ms = statistics.median(v["times"]) * 1000
        mfu = f"{flops / (ms / 1000) / peak * 100:5.1f}%" if peak else "   n/a"
        mem = f"{v['peak_gib']:6.1f} GiB" if "peak_gib" in v else "      n/a"
        print(f"{k:14s} {ms:8.1f} {min(v['times']) * 1000:5.0f}-{max(v['times']) * 1000:<6.0f} "
              f"{total / ms * 1000:11,.0f} {mfu} {mem}  {v['compile_s']:.0f} s", flush=True)
    base = variants.get("flash")
    for k, v in variants.items():
        if base and v is not base:
            n = min(len(v["losses"]), len(base["losses"]))
            diff = max(abs(a - b) for a, b in zip(v["losses"][:n], base["losses"][:n]))
            speed = statistics.median(base["times"]) / statistics.median(v["times"])
            print(f"{k} vs flash: {speed:.3f}x the speed; losses over the same {n} steps from the same init: "
                  f"max |diff| {diff:.2g} (losses {base['losses'][0]:.3f} -> {base['losses'][n - 1]:.3f})",
                  flush=True)

    profiles = {k: time_by_kind(v["step"], cuda) for k, v in variants.items()}
    if profiles:
        print(f"\none profiled step, {'GPU kernel' if cuda else 'CPU aten op'} ms by kind:")
        print(f"{'':15s}" + "".join(f"{k:>15s}" for k in profiles))
        for kind in [k for k, _ in KINDS] + ["other"]:
            print(f"{kind:15s}" + "".join(f"{kinds.get(kind, 0.0):15.1f}" for kinds, _ in profiles.values()))
        print(f"{'total':15s}" + "".join(f"{sum(kinds.values()):15.1f}" for kinds, _ in profiles.values()))
        first, (_, slowest) = next(iter(profiles.items()))
        print(f"slowest in {first}: " + "; ".join(f"{ms:.1f} ms {name[:70]}" for ms, name in slowest[:5]))
        for k, (_, kernels) in profiles.items():
            names = sorted({n for _, n in kernels if re.search(dict(KINDS)["attention"], n, re.I)})
            print(f"attention kernels in {k}: {', '.join(n[:60] for n in names[:3]) or '-'}")

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
        print(f"\nfirst val batch after training compiled: {train_graph:.2f} s on the training graph, "
              f"{eval_graph:.2f} s in eval + no_grad (a second compile)", flush=True)

    if args.loop:
        base_ms = statistics.median(base["times"]) * 1000 if base else None
        # the loop is another process that needs the GPU's memory: give back this one's (models, optimizer
        # states, the allocator's cache)
        variants.clear()
        base = None
        gc.collect()
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
            print(f"\nGPU memory this process still holds: {torch.cuda.memory_reserved(device) / 2**30:.1f} GiB")
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
            if base_ms:
                line += f"; loop / model step = {base_ms / ms:.3f}"
            print(line)


if __name__ == "__main__":
    main()
