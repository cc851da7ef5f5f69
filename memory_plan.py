"""
What a step holds on each GPU, planned before step 0 (docs/memory.md derives the activations' bytes), and
out-of-memory errors as one line that names the fix.
"""
import functools
import math
import re
from dataclasses import asdict, replace

import torch

from disk import pretty_bytes
from train_gpt2 import GPT, GPTConfig, UsageError


@functools.lru_cache(maxsize=8)
def meta_model(**shape):
    with torch.device("meta"):  # shapes only: an XL fits no CPU with its optimizer
        return GPT(GPTConfig(**shape))


def memory_plan(model_cfg, cfg, world, dtype, parallel, accum):
    """
    What one micro-batch step holds on each GPU (rank 0: the largest shard), in bytes by part, before step 0.
    Parameters, gradients and optimizer state are exact: the sizes of the tensors the run will make. The
    activations come from a formula: the bytes per token each op of this model saves for backward (measured on
    CPU with saved_tensors_hooks, tests/test_memory.py), and the logits' transient copies around the loss.
    Left out: allocator slack, the CUDA context (~0.5 GB), NCCL's buffers and torch.compile's workspace.
    """
    model = meta_model(**asdict(model_cfg))
    params = list(model.parameters())
    # FSDP2 cuts each parameter into world row-chunks (torch.chunk's sizes); rank 0 has the largest
    local = ((lambda p: math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0])) if parallel == "fsdp"
             else torch.numel)
    N = sum(p.numel() for p in params)
    plan = {"parameters": sum(4 * local(p) for p in params), "gradients": sum(4 * local(p) for p in params)}
    if parallel == "ddp":
        plan["DDP's gradient buckets"] = 4 * N
    if parallel == "fsdp" and accum > 1:
        plan["whole gradients while accumulating"] = 4 * N  # FSDP2 keeps them unsharded until the last
                                                            # micro-step
    matrices = ({id(p) for p in model.transformer.h.parameters() if p.dim() == 2} if cfg.optimizer == "muon"
                else set())
    # AdamW: two fp32 moments and a float32 step per tensor; Muon: one fp32 momentum per matrix
    plan["optimizer state"] = sum(4 * p.numel() if id(p) in matrices else 8 * local(p) + 4 for p in params)
    half = dtype in ("bfloat16", "float16")  # autocast's 2-byte activations and weight copies
    C, L, V, H = model_cfg.n_embd, model_cfg.n_layer, model_cfg.vocab_size, model_cfg.n_head
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    if parallel == "fsdp":  # gathered for compute: the root (embeddings) and two blocks (one prefetched)
        plan["gathered weights"] = (2 if half else 4) * (N - L * block + 2 * block)
    elif half:
        plan["autocast's half-precision weight copies"] = 2 * L * block + 2 * V * C
    tokens = cfg.batch_size * cfg.seq_len
    # per token, what a block saves for backward (docs/memory.md, op by op); with --recompute, its input
    per_block = (36 * C if half else 64 * C) + 4 * H + 16
    kept = 4 * C if cfg.recompute else per_block
    # outside the blocks: ln_f's input and lm_head's, the token ids and targets, the loss's fp32 log-softmax
    plan["activations kept for backward"] = tokens * (L * kept + (6 * C if half else 8 * C) + 16 + 4 * V)
    if cfg.recompute:
        plan["one block recomputed in backward"] = tokens * per_block
    # the logits, their fp32 copy and their gradients, alive together around the loss
    plan["logits around the loss"] = tokens * 12 * V
    return plan


def checkpoint_bytes(model_cfg, cfg):
    """A checkpoint's size before it is written: the whole model's float32 weights and optimizer state, as one
    unsharded GPU holds them (the pickle, the RNG states and the zip add a few KB)."""
    plan = memory_plan(model_cfg, cfg, 1, "float32", None, 1)
    return plan["parameters"] + plan["optimizer state"]


def check_memory(model_cfg, cfg, world, dtype, parallel, accum, device, master):
    """Print the memory plan; stop (before anything is written) with the fix when it does not fit the GPU."""
    plan = memory_plan(model_cfg, cfg, world, dtype, parallel, accum)
    need = sum(plan.values())
    if master:
        print(f"memory plan per GPU: {pretty_bytes(need)} = "
              + ", ".join(f"{k} {pretty_bytes(v)}" for k, v in plan.items()), flush=True)
    if device.type != "cuda" or not cfg.memory_check:
        return need
    free, _ = torch.cuda.mem_get_info(device)
    if need <= free:
        return need
    per_rank = cfg.total_batch_size // (cfg.seq_len * world)  # sequences per rank and step

    def largest(**kw):  # the largest micro-batch that fits and divides the step (accumulation fills the rest)
        return next((b for b in range(cfg.batch_size, 0, -1) if per_rank % b == 0 and sum(memory_plan(
            model_cfg, replace(cfg, batch_size=b, **kw), world, dtype, parallel,
            per_rank // b).values()) <= free), None)
    if b := largest():
        fix = f"use --batch_size {b} (accumulation keeps --total_batch_size)"
    elif not cfg.recompute and (b := largest(recompute=True)):
        fix = f"add --recompute with --batch_size {b}"
    else:
        fix = ("shard the model over more GPUs with --fsdp under torchrun"
               + ("" if cfg.recompute else " and --recompute"))
    raise UsageError(f"the memory plan needs {pretty_bytes(need)} per GPU, {device} has {pretty_bytes(free)} "
                     f"free: {fix}; --no-memory_check runs anyway")


def out_of_memory_advice(message, cfg):
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", message)
    free = re.search(r"of which ([\d.]+ \w+) is free", message)
    figures = (f"asked for {asked[1]} with {free[1]} free" if asked and free
               else message.splitlines()[0][:200] if message else "no details")
    smaller = (f"--batch_size {cfg.batch_size // 2} (accumulation keeps --total_batch_size), "
               if cfg.batch_size > 1 else "")
    return (f"out of memory ({figures}): try {smaller}--recompute, or --fsdp under torchrun; "
            "the last checkpoint and log.txt are intact")
