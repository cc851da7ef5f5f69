"""
What a step holds on each GPU, planned before step 0 (docs/memory.md derives the activations' bytes), what
--eval_only holds, out-of-memory errors as one line that names the fix, and --recompute, which trades memory
for a second forward.
"""
import functools
import math
import re
from dataclasses import asdict, replace

import torch
import torch.utils.checkpoint

from disk import pretty_bytes
from train_gpt2 import GPT, GPTConfig, UsageError


def apply_recompute(model):
    """Activation checkpointing per block: in training a block keeps only its input and reruns its forward in
    backward. The modules and state_dict keys are untouched."""
    for block in model.transformer.h:
        def forward(x, kv_cache=None, _forward=block.forward):
            if kv_cache is None and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_forward, x, use_reentrant=False)
            return _forward(x, kv_cache)  # sampling and HellaSwag keep nothing for backward anyway
        block.forward = forward


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
    need = print_plan(plan, "memory plan per GPU", master)
    free = free_memory(device, cfg)
    if free is None or need <= free:
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
    raise too_big(need, free, device, fix)


def forward_bytes(model_cfg, dtype, tokens, hellaswag=False):
    """
    The most bytes one forward of `tokens` tokens holds at once under no_grad, weights aside (docs/memory.md):
    nothing is kept for backward, so it is the larger of a block's MLP and the loss (checked against the CPU
    allocator's peak in tests/test_memory.py).
    """
    half = dtype in ("bfloat16", "float16")
    a = 2 if half else 4  # bytes of an activation under autocast
    C, V = model_cfg.n_embd, model_cfg.vocab_size
    # live throughout: a block's fp32 input (its caller holds it), the token ids and targets (HellaSwag: mask)
    base = 4 * C + 16
    # in a block's MLP: the residual after attention and ln_2's output (fp32), c_fc's output and GELU's
    block = 8 * C + 8 * a * C
    # around the loss: the logits, their fp32 copy (under autocast; HellaSwag's boolean index copies the
    # ending tokens' logits in any dtype) and log_softmax's fp32 output
    loss = a * V + (4 * V if half or hellaswag else 0) + 4 * V
    return tokens * (base + max(block, loss))


HELLASWAG_BATCH = 16  # examples per forward: hellaswag.evaluate's default, as evaluate_ranks runs it


def eval_plan(model_cfg, cfg, dtype, hellaswag_tokens):
    """
    What --eval_only holds on its GPU, in bytes by part: the float32 weights and autocast's half-precision
    copies (as memory_plan counts them), and the larger of its two no-grad forwards, which run one after the
    other: val's (--batch_size x --seq_len) and HellaSwag's first batch (HELLASWAG_BATCH examples of 4 rows of
    hellaswag_tokens, its longest row; 0 without HellaSwag), planned as if all their tokens were endings.
    """
    train = memory_plan(model_cfg, cfg, 1, dtype, None, 1)
    plan = {k: v for k, v in train.items() if k in ("parameters", "autocast's half-precision weight copies")}
    val = forward_bytes(model_cfg, dtype, cfg.batch_size * cfg.seq_len)
    hellaswag = forward_bytes(model_cfg, dtype, 4 * HELLASWAG_BATCH * hellaswag_tokens, hellaswag=True)
    if val >= hellaswag:
        plan["val's forward"] = val
    else:
        plan["HellaSwag's forward"] = hellaswag
    return plan


def check_eval_memory(model_cfg, cfg, dtype, hellaswag_tokens, device, master):
    """check_memory for --eval_only, before the model moves to the GPU: its fix is a smaller --batch_size (or
    --no-hellaswag), the flags it reads."""
    plan = eval_plan(model_cfg, cfg, dtype, hellaswag_tokens)
    need = print_plan(plan, "memory plan per GPU (--eval_only)", master)
    free = free_memory(device, cfg)
    if free is None or need <= free:
        return need

    def largest(tokens):  # val's loss is the same at any --batch_size: a short last batch is padded
        return next((b for b in range(cfg.batch_size, 0, -1) if sum(eval_plan(
            model_cfg, replace(cfg, batch_size=b), dtype, tokens).values()) <= free), None)
    if b := largest(hellaswag_tokens):
        fix = f"use --batch_size {b}"
    elif hellaswag_tokens and (b := largest(0)):
        fix = "add --no-hellaswag" + (f" with --batch_size {b}" if b < cfg.batch_size else "")
    else:
        fix = "--batch_size 1 does not fit either: evaluate on a GPU with more free memory, or --device cpu"
    raise too_big(need, free, device, fix)


def print_plan(plan, title, master):
    need = sum(plan.values())
    if master:
        parts = ", ".join(f"{k} {pretty_bytes(v)}" for k, v in plan.items())
        print(f"{title}: {pretty_bytes(need)} = {parts}", flush=True)
    return need


def free_memory(device, cfg):
    """The GPU's free bytes, or None where nothing is checked: not a GPU, or --no-memory_check."""
    if device.type != "cuda" or not cfg.memory_check:
        return None
    return torch.cuda.mem_get_info(device)[0]


def too_big(need, free, device, fix):
    return UsageError(f"the memory plan needs {pretty_bytes(need)} per GPU, {device} has "
                      f"{pretty_bytes(free)} free: {fix}; --no-memory_check runs anyway")


def out_of_memory_advice(message, cfg):
    """An out-of-memory error as one line naming the flags that lower what this run holds."""
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", message)
    free = re.search(r"of which ([\d.]+ \w+) is free", message)
    figures = (f"asked for {asked[1]} with {free[1]} free" if asked and free
               else message.splitlines()[0][:200] if message else "no details")
    if cfg.eval_only:  # it reads no accumulation, --recompute or --fsdp, and writes nothing
        fixes = [f"--batch_size {cfg.batch_size // 2}"] if cfg.batch_size > 1 else []
        if cfg.hellaswag:  # HellaSwag's batches are its own: only leaving it out lowers them
            fixes.append("--no-hellaswag if the val loss was printed")
        fix = f"try {', or '.join(fixes)}" if fixes else "use a GPU with more free memory, or --device cpu"
        return f"out of memory ({figures}): {fix}"
    smaller = (f"--batch_size {cfg.batch_size // 2} (accumulation keeps --total_batch_size), "
               if cfg.batch_size > 1 else "")
    return (f"out of memory ({figures}): try {smaller}--recompute, or --fsdp under torchrun; "
            "the last checkpoint and log.txt are intact")
