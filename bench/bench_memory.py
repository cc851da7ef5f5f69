"""
The memory plan (memory_plan.memory_plan, printed before step 0 of every run) for the GPT-2 family, and on a CPU
the bytes autograd really keeps for a small model beside the plan's formula.

    python bench/bench_memory.py            # the table, then the CPU measurement (a few seconds)

Plan: GiB per GPU for one micro-batch step, bf16 autocast, T=1024, AdamW, DDP or --fsdp over 8 GPUs, with and
without --recompute, at each preset's tokens per step. Prints figures and asserts nothing.
"""
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from memory_plan import memory_plan  # noqa: E402
from memory_plan import apply_recompute  # noqa: E402
from train_gpt2 import GPT, GPTConfig, TrainConfig, parse_args  # noqa: E402

GiB = 2**30


def saved_bytes(model, x, y):
    """Bytes of the tensors autograd keeps for backward of model(x, y) (parameters aside), each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    return sum(seen.values())


def kept_bytes(model_cfg, B, T, recompute):
    """(what autograd keeps for backward of one float32 micro-batch of a fresh model, what the plan says it keeps)"""
    torch.manual_seed(0)
    model = GPT(model_cfg)
    if recompute:
        apply_recompute(model)
    x = torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(0))
    plan = memory_plan(model_cfg, TrainConfig(batch_size=B, seq_len=T, recompute=recompute), 1, "float32", None, 1)
    return saved_bytes(model, x, x), plan["activations kept for backward"]


def main():
    sizes = (1, 2, 4, 8, 16, 32, 64)
    print("GiB per GPU by micro-batch B, recompute off / on (80 GB = 74.5 GiB, 40 GB = 37.3 GiB):\n")
    print("| preset | parallel | " + " | ".join(f"B={B}" for B in sizes) + " |")
    print("| --- | --- |" + " ---: |" * len(sizes))
    for preset in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        model_cfg, cfg, _, _ = parse_args(["--preset", preset])
        for parallel in ("ddp", "fsdp"):
            cells = []
            for B in sizes:
                accum = max(1, cfg.total_batch_size // (B * cfg.seq_len * 8))
                total = [sum(memory_plan(model_cfg, replace(cfg, batch_size=B, recompute=r), 8, "bfloat16", parallel,
                                         accum).values()) / GiB for r in (False, True)]
                cells.append(f"{total[0]:.1f} / {total[1]:.1f}")
            print(f"| `{preset}` | {parallel.upper()} x 8 | " + " | ".join(cells) + " |")

    print("\nOn this CPU, float32: bytes autograd keeps for backward (saved_tensors_hooks) vs the plan's formula")
    model_cfg = GPTConfig(block_size=256, n_layer=6, n_head=4, n_embd=256)
    for recompute in (False, True):
        measured, planned = kept_bytes(model_cfg, 2, 256, recompute)
        print(f"6 layers, width 256, B=2, T=256, recompute {'on ' if recompute else 'off'}: measured "
              f"{measured / 2**20:.1f} MiB, formula {planned / 2**20:.1f} MiB ({measured / planned:.3f}x)")


if __name__ == "__main__":
    main()
