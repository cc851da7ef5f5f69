"""
GPT-2 (124M) from scratch, in the order the data flows: the tokenizer, the model and OpenAI's weights, the
data loader, the optimizer, the step, evaluation, checkpoints and the loop. Importing this file runs nothing.

    python train_gpt2.py --preset shakespeare                  # small GPT on a laptop CPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # GPT-2 124M on FineWeb-Edu 10B
    python train_gpt2.py --init_from gpt2 --sample --prompt "Hello, I'm a language model,"
    python train_gpt2.py --init_from log/model_019073.pt --export gpt2_hf

Every flag is a field of GPTConfig, TrainConfig or SampleConfig, with its default and reason; a --preset sets
several at once (presets.py) and explicit flags override it. The machinery beside it is in devices.py,
memory_plan.py, run_checks.py, ranks.py, preemption.py, outliers.py, disk.py, logger.py, muon.py, hf_export.py
and eval_only.py.
"""

import argparse
import contextlib
import datetime
import functools
import glob
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tiktoken_ext.openai_public import r50k_pat_str

from bin_shards import open_bin
from disk import by_name, check_checkpoint_room, load_checkpoint, pretty_bytes, write_checkpoint
from devices import keep_freed_memory, peak_flops, resolve_compile, resolve_device, resolve_precision
from errors import UsageError
from logger import Logger
from outliers import SkipOutliers, step_skipped
from preemption import StopOnSignal, Stopped
from presets import PRESETS
from ranks import attempt_store, exit_if_a_rank_died, on_every_rank, on_rank_0
from run_checks import (check_config, check_resume, check_same_data, check_shape, data_identity,
                        find_checkpoint, find_run, grad_accum_steps)


# -----------------------------------------------------------------------------
# the tokenizer


EOT = 50256  # <|endoftext|>: the document separator in every shard
GPT2_VOCAB = 50257  # real token ids; vocab_size 50304 pads to a multiple of 64 for faster matmuls
BPE_FILE = Path(__file__).with_name("gpt2.tiktoken")
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    # from the shipped BPE ranks, not tiktoken.get_encoding("gpt2"), which downloads them
    ranks = tiktoken.load.load_tiktoken_bpe(str(BPE_FILE), expected_hash=BPE_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=GPT2_VOCAB)


# -----------------------------------------------------------------------------
# the model, OpenAI's weights and sampling


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50304  # 50257 GPT-2 tokens padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        causal = True
        if kv_cache is not None:
            # this layer's [k, v] of earlier positions: after the prompt, one token at a time sees them all
            if kv_cache[0] is not None:
                assert T == 1, "after the prompt, the KV cache takes one token at a time"
                k = torch.cat([kv_cache[0], k], dim=2)
                v = torch.cat([kv_cache[1], v], dim=2)
                causal = False
            kv_cache[0], kv_cache[1] = k, v
        # flash attention (Dao et al. 2022) where the backend has it
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017), as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                # GPT-2 paper: residual projections scaled by 1/sqrt(N), N = 2 residual adds per layer
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once

    def forward(self, idx, targets=None, kv_cache=None):
        # idx (B, T) token ids; kv_cache: a list of per-layer [k, v] when generating
        B, T = idx.size()
        past = 0 if kv_cache is None or kv_cache[0][0] is None else kv_cache[0][0].size(2)
        if past + T > self.config.block_size:
            raise UsageError(f"sequence of {past + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_cache is None else kv_cache[i])
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_path):
        """OpenAI's GPT-2 from the HF hub by name, or from a local folder saved by transformers."""
        from hf_export import load_hf  # only here: it imports transformers, which training never needs
        shape, state_dict = load_hf(name_or_path)
        model = cls(GPTConfig(**shape))
        model.load_state_dict(state_dict)
        return model


def pad_vocab(model, vocab_size):
    """The model with its tied embedding grown to vocab_size rows, each new one the mean of the real rows: the
    real logits are unchanged; the loss grows by at most log(1 + new / real rows) (tests/test_finetune.py)"""
    sd = model.state_dict()
    wte = sd["transformer.wte.weight"]
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = torch.cat(
        [wte, wte.mean(dim=0, keepdim=True).expand(vocab_size - len(wte), -1)])
    padded = GPT(GPTConfig(**{**asdict(model.config), "vocab_size": vocab_size}))
    padded.load_state_dict(sd)
    return padded


def flops_per_token(model, T):
    # PaLM (Chowdhery et al. 2022, app. B): 6N (N without the position table) + 12*L*H*Q*T for attention
    c = model.config
    N = model.num_params() - model.transformer.wpe.weight.numel()
    return 6 * N + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T


@torch.no_grad()  # not inference_mode: FSDP2 would gather its weights as inference tensors
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, use_cache=True):
    """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 is greedy decoding."""
    if top_k is not None and top_k <= 0:
        raise UsageError(f"top_k must be >= 1 (got {top_k}); use e.g. 50")
    block_size = model.config.block_size
    if idx.size(1) > block_size:
        raise UsageError(f"prompt is {idx.size(1)} tokens, longer than block_size {block_size}; shorten it")
    was_training = model.training
    model.eval()
    kv_cache, cached = None, 0
    for _ in range(max_new_tokens):
        if use_cache and kv_cache is not None and cached < block_size:
            logits, _ = model(idx[:, -1:], kv_cache=kv_cache)
            cached += 1
        else:
            # the prompt, a cache-free step, or a full cache: run the last block_size tokens afresh
            kv_cache = [[None, None] for _ in range(model.config.n_layer)] if use_cache else None
            logits, _ = model(idx[:, -block_size:], kv_cache=kv_cache)
            cached = min(idx.size(1), block_size)
        logits = logits[:, -1, :GPT2_VOCAB].float()  # padded vocab rows are never sampled
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            # a softmax over the top k logits only: the whole vocab's distribution cut to its top k
            topk_logits, topk_ids = torch.topk(logits, min(top_k or GPT2_VOCAB, GPT2_VOCAB), dim=-1)
            choice = torch.multinomial(F.softmax(topk_logits / temperature, dim=-1), 1, generator=generator)
            next_id = torch.gather(topk_ids, -1, choice)
        idx = torch.cat([idx, next_id], dim=1)
    model.train(was_training)
    return idx


def sample_text(model, cfg, seed=42, device="cpu"):
    """cfg: a SampleConfig. Returns cfg.num_samples strings, the prompt included."""
    enc = get_tokenizer()
    tokens = enc.encode(cfg.prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    idx = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(cfg.num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                   generator=gen)
    return [enc.decode(row) for row in out.tolist()]


# -----------------------------------------------------------------------------
# data


def open_shard(path):
    """The shard memory-mapped: only its header is read, so every shard can be checked up front. A .bin is
    llm.c's format (bin_shards.py)."""
    if path.endswith(".bin"):
        return open_bin(path)
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read shard {path} ({e}); regenerate it with fineweb.py") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UsageError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, not 1-D uint16 token "
                         "ids; regenerate it with fineweb.py")
    return tokens


def load_tokens(path, vocab_size):
    tokens = np.asarray(open_shard(path))
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise UsageError(f"shard {path} holds token id {int(tokens.max())} >= vocab_size {vocab_size}; "
                         "is it a GPT-2 token shard?")
    return tokens


class DataLoader:
    """
    Sequences of T tokens (plus one target) cut from a list of shards, one epoch after another. Sequence q is
    a pure function of (q, seed): each epoch visits the shards, and each shard's documents, in a seeded order.
    A step's global batch is the same sequences for any split of accum * world: resuming needs only the step.
    """

    def __init__(self, shards, T, vocab_size, seed=1337, shuffle=True):
        # shards: .npy paths, or in-memory uint16 arrays (a tokenized .txt file)
        self.shards, self.T, self.vocab_size = shards, T, vocab_size
        self.seed, self.shuffle = seed, shuffle
        lengths = [len(s) if isinstance(s, np.ndarray) else len(open_shard(s)) for s in shards]
        self.seqs_per_shard = np.array([max(n - 1, 0) // T for n in lengths])
        self.seqs_per_epoch = int(self.seqs_per_shard.sum())
        if self.seqs_per_epoch == 0:
            raise UsageError(f"{sum(lengths)} tokens are too few for one sequence of seq_len {T}; "
                             "use more data or a smaller --seq_len")
        self._cache = {}  # (epoch, shard) -> tokens in this epoch's document order; holds at most two
        self._epoch = None  # (epoch, its shard order, where each shard's sequences end): made once an epoch

    def _shard_order(self, epoch):
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def _tokens(self, epoch, shard):
        key = (epoch if self.shuffle else 0, shard)
        if key not in self._cache:
            s = self.shards[shard]
            tokens = s if isinstance(s, np.ndarray) else load_tokens(s, self.vocab_size)
            if self.shuffle:
                # documents start at EOT; a shard may also open with the tail of the previous shard's last one
                starts = np.flatnonzero(tokens == EOT)
                if len(starts) == 0 or starts[0] != 0:
                    starts = np.concatenate([[0], starts])
                ends = np.append(starts[1:], len(tokens))
                order = np.random.default_rng([self.seed, epoch, shard]).permutation(len(starts))
                tokens = np.concatenate([tokens[starts[i]:ends[i]] for i in order])
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = tokens
        return self._cache[key]

    def _runs(self, q, n):
        """Sequences q..q+n-1 in runs that each lie in one shard: (that shard's tokens, the run's first token,
        its number of sequences). A run ends at a shard's end, which may be an epoch's."""
        while n > 0:
            epoch, r = divmod(q, self.seqs_per_epoch)
            if self._epoch is None or self._epoch[0] != epoch:
                order = self._shard_order(epoch)
                self._epoch = (epoch, order, np.cumsum(self.seqs_per_shard[order]))
            _, order, ends = self._epoch
            i = int(np.searchsorted(ends, r, side="right"))  # r falls in the i-th shard of the order
            first = r - (int(ends[i - 1]) if i else 0)  # r's place among that shard's sequences
            count = min(n, int(ends[i]) - r)
            yield self._tokens(epoch, int(order[i])), first * self.T, count
            q, n = q + count, n - count

    def sequence(self, q):
        tokens, start, _ = next(self._runs(q, 1))
        return tokens[start:start + self.T + 1]

    def batch(self, indices):
        rows = [self.sequence(q) for q in indices]  # perhaps none: a rank with no val batch left
        buf = torch.from_numpy(np.array(rows, dtype=np.int64).reshape(len(rows), self.T + 1))
        return buf[:, :-1], buf[:, 1:]  # inputs (B, T), targets (B, T)

    def step_batches(self, step, accum, rank, world, B, pin_memory=False):
        """This rank's accum micro-batches of one optimizer step: inputs and targets, each (accum, B, T)."""
        # pinned on CUDA: only a copy from page-locked memory overlaps the GPU's work
        x, y = (torch.empty((accum, B, self.T), dtype=torch.long, pin_memory=pin_memory) for _ in range(2))
        xs, ys = x.numpy(), y.numpy()
        for micro in range(accum):
            b = 0
            for tokens, start, count in self._runs(((step * accum + micro) * world + rank) * B, B):
                # consecutive sequences share a token (one's last target is the next's first input): the
                # inputs are the run's tokens as count rows of T, the targets the same one token on
                run = tokens[start:start + count * self.T + 1]
                xs[micro, b:b + count] = run[:-1].reshape(count, self.T)
                ys[micro, b:b + count] = run[1:].reshape(count, self.T)
                b += count
        return x, y


def find_data(path):
    """--data: a folder of fineweb.py's (or llm.c's .bin) shards, or a .txt file -> (train shards, val
    shards)."""
    if path.endswith(".txt"):
        if not os.path.isfile(path):
            raise UsageError(f"text file {path} does not exist; try --data input.txt")
        text = open(path, encoding="utf-8").read()
        # straight into numpy: encode_ordinary's list of ints costs ~56 bytes a token (15 GB for a 1 GB text);
        # disallowed_special=(): <|endoftext|> in the text is text, as encode_ordinary takes it
        tokens = get_tokenizer().encode_to_numpy(text, disallowed_special=()).astype(np.uint16)
        if len(tokens) < 20:
            raise UsageError(f"{path} holds only {len(tokens)} tokens; give it more text")
        split = int(0.9 * len(tokens))  # the last 10% is held out for validation
        return [tokens[:split]], [tokens[split:]]
    for meta_file in glob.glob(os.path.join(path, "*_meta.json")):  # written by fineweb.py
        with open(meta_file) as f:
            meta = json.load(f)
        if meta.get("tokenizer") != "gpt2":
            raise UsageError(f"{meta_file} says the shards hold {meta.get('tokenizer')} tokens, not GPT-2's")
        if not meta.get("complete") and int(os.environ.get("RANK", 0)) == 0:
            print(f"note: {meta_file} says fineweb.py has not finished; training on the "
                  f"{len(meta.get('shards', []))} shards written so far")
    train, val = (sorted(glob.glob(os.path.join(path, f"*_{split}_*.npy"))
                         + glob.glob(os.path.join(path, f"*_{split}_*.bin"))) for split in ("train", "val"))
    if {os.path.splitext(f)[1] for f in train + val} == {".npy", ".bin"}:  # the same data twice, perhaps
        raise UsageError(f"'{path}' holds both .npy and .bin shards: keep one kind in a --data folder")
    if not train or not val:
        missing = "train" if not train else "val"
        raise UsageError(f"no {missing} shards (*_{missing}_*.npy or .bin) in '{path}': make them with "
                         "`python fineweb.py` (--input FILES: local text; --download fineweb10B: llm.c's), "
                         "pass --data FOLDER_OR_TXT, or try `python train_gpt2.py --preset shakespeare`")
    return train, val


# -----------------------------------------------------------------------------
# optimizer and learning rate schedule


def configure_optimizer(model, weight_decay, lr, device_type, optimizer="adamw", muon_lr=None,
                        muon_momentum=0.95, muon_split_qkv=True):
    # decay the 2-D tensors (matmul weights, embeddings); biases and LayerNorm gains stay undecayed
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "muon":  # Muon takes the blocks' matrices (Jordan 2024); AdamW all the rest
        matrices = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
        params = [p for p in params if id(p) not in matrices]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type == "cuda"  # one kernel for all tensors instead of a loop of small ones
    adamw = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    if optimizer == "adamw":
        return adamw
    from muon import MuonAdamW
    return MuonAdamW(model, adamw, lr if muon_lr is None else muon_lr, weight_decay, muon_momentum,
                     muon_split_qkv)


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# devices, processes and wrapping


def setup_distributed(device_arg, fsdp=False, timeout_s=600):
    """(distributed, rank, world size, device). Under torchrun, and for --fsdp, also the process group, whose
    waits on other ranks give up after timeout_s (--dist_timeout) with an error instead of hanging."""
    torchrun = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ.get(k, d))
                               for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = resolve_device(device_arg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if torchrun and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend=backend, store=attempt_store(timeout), rank=rank, world_size=world,
                                timeout=timeout)
    elif torchrun:  # a store of this attempt's own: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or another launcher
        dist.init_process_group(backend=backend, timeout=timeout)
    elif fsdp:
        # FSDP2 shards over a process group even in one process: a group of one, no rendezvous needed
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    return torchrun or fsdp, rank, world, device


def all_reduce(t, distributed):
    if distributed:
        dist.all_reduce(t)  # SUM: gloo has no AVG
    return t


def wrap_model(raw_model, parallel, use_compile, dtype, device, recompute=False):
    """The model the step and val run. parallel: None, "ddp" or "fsdp". Recompute, then compile, then DDP or
    sharding (as in torchtitan). fully_shard changes raw_model in place: under FSDP every forward of it,
    sampling and HellaSwag included, is a collective of all ranks."""
    if recompute:
        from memory_plan import apply_recompute
        apply_recompute(raw_model)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # half-precision weights gathered (half fp32's traffic), fp32 gradients reduced and masters stepped,
        # as in torchtitan; docs/precision.md says what that changes
        mp = MixedPrecisionPolicy(param_dtype=None if dtype == "float32" else getattr(torch, dtype),
                                  reduce_dtype=torch.float32)
        for block in raw_model.transformer.h:
            if use_compile:
                block.forward = torch.compile(block.forward, fullgraph=True)  # keeps the state_dict keys
            fully_shard(block, mp_policy=mp)
        fully_shard(raw_model, mp_policy=mp)  # the rest, one unit: wte (= the tied lm_head), wpe, ln_f
        return raw_model
    # a graph break is an error
    compiled = torch.compile(raw_model, fullgraph=True) if use_compile else raw_model
    if parallel == "ddp":
        return DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    return compiled


# -----------------------------------------------------------------------------
# the step


def accumulate_gradients(model, batches, autocast, parallel=None, *, scaler=None):
    """Forward and backward over micro-batches; returns the mean loss. The gradients equal one big batch's
    (times the GradScaler's scale, when there is one)."""
    loss_sum = 0.0
    for i, (x, y) in enumerate(batches):
        # DDP and FSDP reduce gradients only in the last micro-step's backward; set before the forward
        sync = i == len(batches) - 1
        if parallel == "fsdp":
            model.set_requires_gradient_sync(sync)
        with (model.no_sync() if parallel == "ddp" and not sync else contextlib.nullcontext()), autocast:
            _, loss = model(x, y)
            loss = loss / len(batches)  # the sum over micro-steps becomes the mean of the big batch
            # fp16: the loss scaled up (2**16 to begin with) so that small gradients do not flush to zero
            (loss if scaler is None else scaler.scale(loss)).backward()
        loss_sum += loss.detach()
    return loss_sum


def optimizer_step(optimizer, params, max_norm, loss, scaler=None, outliers=None):
    """Clip and step. Returns the gradient norm before clipping, a tensor (read with the loss: one host sync),
    and why the update was skipped for --skip_outliers (None: applied), which reads the loss and the norm
    first, as llm.c does. A GradScaler unscales first and skips a step with an inf/nan gradient itself."""
    if scaler is not None:
        if hasattr(optimizer, "share_grads"):  # MuonAdamW: c_attn's gradient reaches unscale_ through views
            optimizer.share_grads()
        scaler.unscale_(optimizer)
    norm = clip_grad_norm(params, max_norm)
    skip = None
    if outliers is not None:
        loss_value, norm_value = torch.stack([loss, norm]).tolist()
        if not (scaler is not None and math.isfinite(loss_value) and not math.isfinite(norm_value)):
            skip = outliers.check(loss_value, norm_value)  # an fp16 overflow is the GradScaler's to skip
    if skip is None:
        # fused AdamW (CUDA) takes the scaler's inf flag into its kernel; others make it read it on the host
        optimizer.step() if scaler is None else scaler.step(optimizer)
    if scaler is not None:
        scaler.update()  # halves the scale after an overflow, doubles it after 2000 clean steps
    return norm, skip


def clip_grad_norm(params, max_norm):
    """The gradient norm before clipping, a plain tensor (under FSDP clip_grad_norm_ gives a DTensor)."""
    # 0: off (max_norm 0 would zero the grads)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor: gathered


# -----------------------------------------------------------------------------
# evaluation


def evaluate_val(model, loader, cfg, rank, world, device, autocast, distributed=False, between_batches=None):
    # The step's module and graph, autograd on: without dropout, train mode gives the same loss, and no_grad
    # would compile a second graph (33 s for 124M on an H200). Through DDP (no_sync), so dynamo splits it.
    # between_batches(): run on every rank before each batch; it may raise to end the eval (a signal)
    n_seqs = min(cfg.val_tokens // cfg.seq_len, loader.seqs_per_epoch)
    mine = list(range(rank, n_seqs, world))
    total = torch.zeros(2, device=device)  # sum of per-token losses, number of tokens
    # every rank runs the same number of batches, some perhaps empty: under FSDP each forward is a collective
    with model.no_sync() if isinstance(model, DDP) else contextlib.nullcontext():
        for i in range(0, math.ceil(n_seqs / world), cfg.batch_size):
            if between_batches is not None:
                between_batches()
            x, y = loader.batch(mine[i:i + cfg.batch_size])
            n_tokens = y.numel()
            # a short last batch is padded to the compiled shape; its -1 targets are ignored by the loss
            pad = (0, 0, 0, cfg.batch_size - len(x))
            loss = batch_loss(model, F.pad(x, pad).to(device), F.pad(y, pad, value=-1).to(device), autocast)
            if n_tokens:  # an empty batch's loss is nan (a mean over no tokens)
                total[0] += loss * n_tokens
                total[1] += n_tokens
    total = all_reduce(total, distributed)
    return (total[0] / total[1]).item()


def batch_loss(model, x, y, autocast):
    # a function of its own: the logits and the autograd graph die on return, before the next batch's forward
    with autocast:
        return model(x, y)[1].detach()


# -----------------------------------------------------------------------------
# checkpoints and resuming


def save_checkpoint(path, raw_model, optimizer, step, cfg, device, distributed, scaler=None, outliers=None):
    """Called on every rank (under FSDP the gathers are collectives); rank 0 writes, and a write that fails
    (a disk filled since step 0) stops every rank with one line, the previous checkpoint intact."""
    if cfg.fsdp:
        # the whole state, gathered a tensor at a time onto rank 0's CPU: one file for any sharding
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(raw_model, optimizer, options=full)
    else:
        model_state, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
    ckpt = {
        # the raw module: no _orig_mod. (compile) or module. (DDP) prefixes
        "model": model_state,
        "config": asdict(raw_model.config),
        "optimizer": optimizer_state,
        "step": step,  # steps done; the next step to run
        "args": asdict(cfg),
        # what --data held, so a resume can tell the same data under another name
        "data": data_identity(cfg.data),
        "loader": {"next_step": step, "seed": cfg.seed, "shuffle": cfg.shuffle},  # a pure function of these
        "rng": {"cpu": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        # --skip_outliers' windows: a resumed run skips what the uninterrupted one would
        **({"outliers": outliers.state_dict()} if outliers is not None else {}),
    }
    def write():
        # the tied wte / lm_head weight stored once (FSDP gathers it under each name, as two tensors)
        model_state["lm_head.weight"] = model_state["transformer.wte.weight"]
        from memory_plan import checkpoint_bytes
        write_checkpoint(path, ckpt, checkpoint_bytes(raw_model.config, cfg))
    on_rank_0(write, distributed)


def load_model(name_or_path, device="cpu"):
    """Our .pt checkpoint, an HF GPT-2 name (gpt2 ... gpt2-xl) or a folder saved by transformers."""
    if name_or_path.endswith(".pt") and not os.path.exists(name_or_path):
        raise UsageError(f"checkpoint '{name_or_path}' does not exist; pass an existing .pt, a folder or a "
                         "model name")
    if os.path.isfile(name_or_path):
        ckpt = load_checkpoint(name_or_path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            raise UsageError(f"'{name_or_path}' is not a train_gpt2.py checkpoint (no model/config entries)")
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    else:
        model = GPT.from_pretrained(name_or_path)
    return model.to(device)


def build_model(cfg, model_cfg, given, ckpt):
    """The unsharded model on the CPU: the checkpoint's weights, --init_from's (weights only: a new run, with
    a fresh optimizer and schedule; --resume continues a run), or a seeded init."""
    if ckpt:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    elif cfg.init_from:
        model = load_model(cfg.init_from)
        # OpenAI's 50257 tokens, padded as for a fresh model
        if model.config.vocab_size < model_cfg.vocab_size:
            model = pad_vocab(model, model_cfg.vocab_size)
        check_shape(asdict(model.config), model_cfg, given, cfg.init_from)
    else:
        model = GPT(model_cfg)
    if cfg.seq_len > model.config.block_size:
        raise UsageError(f"--seq_len {cfg.seq_len} is longer than the model's block_size "
                         f"{model.config.block_size}")
    return model


def restore_state(ckpt, raw_model, optimizer, device, scaler=None, fsdp=False, outliers=None):
    """The optimizer state, the RNGs, the loss scale and the outlier windows of a checkpoint; returns the step
    to continue from."""
    state = ckpt["optimizer"]
    # under FSDP each rank keeps its shards; a state-less checkpoint (fp16, no step taken yet) loads as is, as
    # DCP would give it zero moments at step 1
    if fsdp and state["state"]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(raw_model, optimizer, by_name(state, raw_model, optimizer),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)  # matches the saved parameters by order: index or name keys alike
    # else a run that was not fp16 goes on in fp16 from a fresh scale
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    if outliers is not None and "outliers" in ckpt:
        outliers.load_state_dict(ckpt["outliers"])
    torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), device)
    return ckpt["step"]


# -----------------------------------------------------------------------------
# the loop


def train(cfg, model_cfg, sample_cfg, given=()):
    """The run; returns the signal that stopped it early (with a checkpoint), or None if it ran to the end."""
    distributed, rank, world, device = setup_distributed(cfg.device, cfg.fsdp, cfg.dist_timeout)
    try:
        run = _train
        if cfg.eval_only:
            from eval_only import evaluate_only as run  # only here: it imports this file
        stopped_by = run(cfg, model_cfg, sample_cfg, given, distributed, rank, world, device)
        if distributed:
            dist.barrier()  # every rank done before the group goes: gloo could otherwise abort a rank at exit
        return stopped_by
    except torch.OutOfMemoryError as e:
        from memory_plan import out_of_memory_advice
        # log lines are written whole and checkpoints by rename, so nothing on disk is half-written
        raise UsageError(out_of_memory_advice(str(e), cfg)) from None
    except RuntimeError as e:
        exit_if_a_rank_died(e, rank, cfg.dist_timeout)
        raise
    finally:
        if distributed:
            dist.destroy_process_group()


def _train(cfg, model_cfg, sample_cfg, given, distributed, rank, world, device):
    import core, hellaswag  # here: they (and memory_plan.py) import this file
    from memory_plan import check_memory, checkpoint_bytes
    master = rank == 0
    min_lr = 0.1 * cfg.max_lr if cfg.min_lr is None else cfg.min_lr
    # first: --compile where it cannot run is an error
    use_compile, compile_note = resolve_compile(cfg.compile, device)
    precision = resolve_precision(cfg.dtype, device)
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
    # DDP only where there is another rank to average with; FSDP shards over any number of ranks, one included
    parallel = "fsdp" if cfg.fsdp else "ddp" if world > 1 else None
    B, T = cfg.batch_size, cfg.seq_len
    accum = grad_accum_steps(cfg, world)
    torch.manual_seed(cfg.seed)  # the same init on every rank: FSDP shards it, DDP checks it
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast

    # read on every rank, from each one's disk: a rank that cannot stops them all, before collectives differ
    train_shards, val_shards = on_every_rank(lambda: find_data(cfg.data), distributed)
    rank_0_data = on_rank_0(lambda: data_identity(cfg.data), distributed)
    on_every_rank(lambda: check_same_data(cfg.data, rank_0_data), distributed)
    ckpt_path = on_rank_0(lambda: find_run(cfg, load_checkpoint), distributed)
    resume = lambda: check_resume(load_checkpoint(ckpt_path), ckpt_path, cfg, model_cfg, given, master)
    ckpt = on_every_rank(resume, distributed) if ckpt_path else None
    raw_model = on_every_rank(lambda: build_model(cfg, model_cfg, given, ckpt), distributed)
    plan = lambda: check_memory(raw_model.config, cfg, world, precision.dtype, parallel, accum, device,
                                master)
    planned = on_every_rank(plan, distributed)
    # room on the disk of rank 0, which writes the checkpoints: a full one is found before the work they keep
    ckpt_size, resumed_at = checkpoint_bytes(raw_model.config, cfg), ckpt["step"] if ckpt else 0
    on_rank_0(lambda: check_checkpoint_room(cfg, ckpt_size, resumed_at), distributed)
    raw_model.to(device)
    autocast = precision.autocast(device.type)  # after the memory check: a CUDA autocast needs a CUDA torch
    # the model's vocab_size bounds the data's token ids
    train_loader, val_loader = on_every_rank(lambda: (
        DataLoader(train_shards, T, raw_model.config.vocab_size, cfg.seed, cfg.shuffle),
        DataLoader(val_shards, T, raw_model.config.vocab_size, shuffle=False)), distributed)
    block_size = raw_model.config.block_size
    hella_examples = hellaswag.load_for_run(cfg.hellaswag_data, block_size, master, distributed) \
        if cfg.hellaswag else None
    core_tasks = core.load_for_run(cfg.core_bundle, cfg.core_max_per_task, master, distributed) \
        if cfg.core else None
    # val runs the step's model; HellaSwag (ragged shapes) and sampling (KV cache) run raw_model, eagerly
    model = wrap_model(raw_model, parallel, use_compile, precision.dtype, device, cfg.recompute)
    optimizer = configure_optimizer(raw_model, cfg.weight_decay, cfg.max_lr, device.type, cfg.optimizer,
                                    cfg.muon_lr, cfg.muon_momentum, cfg.muon_split_qkv)
    hypers = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    outliers = SkipOutliers(cfg.skip_outliers) if cfg.skip_outliers else None  # llm.c's -sl/-sg
    start_step = restore_state(ckpt, raw_model, optimizer, device, scaler, cfg.fsdp, outliers) if ckpt else 0
    for group, h in zip(optimizer.param_groups, hypers):
        # load_state_dict brought back the checkpoint's weight_decay, lr...: the command line wins
        group.update(h)
    peak_lrs = [h["lr"] for h in hypers]
    del ckpt

    os.makedirs(cfg.log_dir, exist_ok=True)
    log = Logger(cfg.log_dir, master, cfg.wandb, resume=cfg.resume,
                 config={**asdict(model_cfg), **asdict(cfg), **asdict(sample_cfg), "world_size": world,
                         "autocast_dtype": precision.dtype, "compiled": use_compile})
    log.start_at(start_step, cfg.total_batch_size)
    flops_step = flops_per_token(raw_model, T) * cfg.total_batch_size
    peak = peak_flops(device, precision.dtype)
    log.print(f"{raw_model.num_params():,} parameters | {world} process(es) on {device}"
              f"{f' ({parallel.upper()})' if parallel else ''} | {precision.reason} | compile {use_compile}"
              f"{f' ({compile_note})' if compile_note else ''} | B={B} T={T} accum={accum} | "
              f"{cfg.total_batch_size:,} tokens/step | {train_loader.seqs_per_epoch * T:,} train tokens"
              + (f" | resuming at step {start_step}" if start_step else ""))

    # the next step's batches are cut from the shards in a thread while the GPU runs this step
    prefetcher = ThreadPoolExecutor(max_workers=1)
    load_step = functools.partial(train_loader.step_batches, accum=accum, rank=rank, world=world, B=B,
                                  pin_memory=device.type == "cuda")
    next_batches = prefetcher.submit(load_step, start_step)
    step_times, n_overflows = [], 0
    done = saved = start_step  # steps done, and those the newest checkpoint holds (0: none)
    ckpt_file = lambda steps: os.path.join(cfg.log_dir, f"model_{steps:06d}.pt")
    # a SIGTERM or SIGINT (a reclaimed spot instance, a time limit, Ctrl-C) ends the run after the step in
    # flight, or between an eval's batches, with a checkpoint (preemption.py)
    with StopOnSignal(master, device, distributed) as stop:
        for step in range(start_step, cfg.max_steps):
            last = step == cfg.max_steps - 1
            try:  # a signal cuts the eval short, unlogged: the resumed run starts at this step, eval and all
                if step % cfg.eval_interval == 0 or last:  # val's first check comes before its first batch
                    # compiled: the step's module, through DDP (dynamo splits the graph at its buckets)
                    val_model = model if use_compile else raw_model
                    val_loss = evaluate_val(val_model, val_loader, cfg, rank, world, device, autocast,
                                            distributed, stop.check)
                    log.print(f"step {step:5d} | val loss {val_loss:.4f}")
                    log.log(step, "val", val_loss, ".4f")
                    if hella_examples is not None:
                        correct, total = hellaswag.evaluate_ranks(raw_model, hella_examples, rank, world,
                                                                  device, precision, distributed,
                                                                  stop.check)
                        log.print(f"step {step:5d} | {hellaswag.run_line(correct, total, precision)}")
                        log.log(step, "hella", correct / total, ".4f")
                    if core_tasks is not None and last:
                        with torch.compiler.set_stance("force_eager"):
                            score = core.evaluate(raw_model, core_tasks, device, rank, world, distributed,
                                                  autocast_dtype=precision.autocast_dtype,
                                                  between_batches=stop.check)["core"]
                        log.print(f"step {step:5d} | CORE {score:.4f} | {core.openai_line()}")
                        log.log(step, "core", score, ".4f")
                # under FSDP every rank samples (the same text: one seed), as every forward needs all of them
                if (step > 0 and step % cfg.sample_interval == 0) or last:
                    stop.check()
                    if master or parallel == "fsdp":
                        with autocast, torch.compiler.set_stance("force_eager"):
                            log.samples(step, sample_text(raw_model, sample_cfg, seed=42, device=device))
            except Stopped:
                break

            t0 = time.time()
            x, y = (t.to(device, non_blocking=True) for t in next_batches.result())
            if step + 1 < cfg.max_steps:
                next_batches = prefetcher.submit(load_step, step + 1)
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(model, list(zip(x, y)), autocast, parallel, scaler=scaler)
            # the loss's all-reduce also carries whether any rank has had a signal: every rank stops after the
            # same step, with no collective of its own (full_like: no host-to-device copy, no wait)
            loss, stopping = all_reduce(torch.stack([loss, torch.full_like(loss, stop.signal is not None)]),
                                        distributed)
            loss = loss / world
            lr = get_lr(step, cfg.max_lr, min_lr, cfg.warmup_steps, cfg.max_steps)
            for group, peak_lr in zip(optimizer.param_groups, peak_lrs):
                # one warmup + cosine shape; Muon's group has its own peak
                group["lr"] = lr * (peak_lr / cfg.max_lr)
            norm, outlier = optimizer_step(optimizer, raw_model.parameters(), cfg.grad_clip, loss, scaler,
                                           outliers)
            # the step's one wait for the GPU; a non-finite step stops the run before a checkpoint is written
            loss, norm, stopping = torch.stack([loss, norm, stopping]).tolist()
            dt = time.time() - t0
            skipped = outlier or step_skipped(loss, norm, scaler, step, cfg.log_dir)
            n_overflows += bool(skipped) and not outlier
            done = step + 1
            step_times = (step_times + [dt])[-20:]
            eta = sum(step_times) / len(step_times) * (cfg.max_steps - done)
            mfu = flops_step / dt / (peak * world) * 100 if peak else None
            log.print(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                      f"{dt * 1000:.0f} ms | {cfg.total_batch_size / dt:,.0f} tok/s"
                      f"{f' | MFU {mfu:.1f}%' if mfu else ''} | ETA {eta / 60:.1f} min"
                      + (f" | skipped: {skipped}" if skipped else ""))
            log.log(step, "train", loss, ".6f")
            if skipped:
                log.log(step, "skipped", 1, "d")
            log.figures(step, lr=lr, norm=norm, tokens_per_s=cfg.total_batch_size / dt,
                        **({"mfu": mfu} if mfu else {}))

            if done % cfg.checkpoint_interval == 0 or last:
                save_checkpoint(ckpt_file(done), raw_model, optimizer, done, cfg, device, distributed, scaler,
                                outliers)
                saved = done
            if stopping:
                break
    prefetcher.shutdown()
    stopped = done < cfg.max_steps
    if stopped and saved != done:  # a stop before step 0 has nothing to keep
        save_checkpoint(ckpt_file(done), raw_model, optimizer, done, cfg, device, distributed, scaler,
                        outliers)
        saved = done
    if scaler is not None:
        log.print(f"{n_overflows} of steps {start_step}-{done - 1} skipped for inf/nan fp16 gradients "
                  f"(loss scale now {scaler.get_scale():g})")
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(device)
        log.print(f"peak GPU memory {pretty_bytes(peak_bytes)} (the plan: {pretty_bytes(planned)})")
    if stopped:
        # `STEP stopped SIGNAL` in log.txt: what a job script under torchrun (which exits 1) reads to resume
        log.log(done, "stopped", stop.stopped_by, "d")
        log.print(stop.summary(done, saved and ckpt_file(saved), in_eval=done == step))
    log.close()
    return stop.stopped_by if stopped else None


# -----------------------------------------------------------------------------
# command line


@dataclass
class TrainConfig:
    data: str = "edu_fineweb10B"  # folder of fineweb.py's (or llm.c's .bin) shards, or a .txt (last 10%: val)
    log_dir: str = "log"  # log.txt and checkpoints
    batch_size: int = 64  # micro-batch B per process
    seq_len: int = 1024  # T
    # tokens per optimizer step, ~0.5M as in GPT-3 Small; accumulation fills it
    total_batch_size: int = 524288
    max_lr: float = 6e-4
    min_lr: float = None  # default 0.1 * max_lr
    warmup_steps: int = 715  # 375M tokens, as in GPT-3
    max_steps: int = 19073  # 10B tokens / 524288
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    skip_outliers: float = 0.0  # skip an update whose loss or grad norm z-score is above it, as llm.c; 0: off
    shuffle: bool = True  # seeded shard order per epoch and document order within shards
    eval_interval: int = 250
    val_tokens: int = 10485760  # a fixed prefix of the val split, the same for every world size
    hellaswag: bool = True
    hellaswag_data: str = None  # hellaswag_val.jsonl or its folder; default: hellaswag.py's download cache
    core: bool = False  # CORE as nanochat scores it (core.py), at the last step: 22 tasks, minutes on a GPU
    core_bundle: str = None  # an unpacked eval bundle; default: core.py's download cache
    core_max_per_task: int = None  # the first N rows of each task (a quick look, not comparable)
    sample_interval: int = 250
    checkpoint_interval: int = 5000
    # seconds a rank waits on the others before it exits, so torchrun can restart a hung group: rank 0 writing
    # an XL checkpoint (18.7 GB) is the longest honest wait (docs/fault_tolerance.md)
    dist_timeout: int = 600
    resume: bool = False  # continue from the newest checkpoint in log_dir
    # only evaluate --init_from (or the newest checkpoint in log_dir) as at an eval step: val, HellaSwag, CORE
    eval_only: bool = False
    fsdp: bool = False  # shard parameters, gradients and AdamW's state over the ranks (FSDP2); default DDP
    # activation checkpointing: each block keeps only its input and recomputes in backward
    recompute: bool = False
    memory_check: bool = True  # on a GPU, stop before step 0 (or --eval_only) if the memory plan does not fit
    init_from: str = None  # start from gpt2 ... gpt2-xl, a transformers folder or a .pt checkpoint
    # default: on where inductor can build kernels (CUDA, Triton, compute capability >= 7.0)
    compile: bool = None
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    # auto (bf16, or fp16 + GradScaler where no bf16, float32 on CPU), float32, bfloat16, float16
    dtype: str = "auto"
    seed: int = 1337
    # adamw (the recipe) or muon: Muon for the blocks' matrices (docs/muon_lab_log.md)
    optimizer: str = "adamw"
    # Muon's peak lr on the same schedule; default max_lr (its update RMS matches AdamW's)
    muon_lr: float = None
    muon_momentum: float = 0.95  # torch.optim.Muon's default (Nesterov)
    muon_split_qkv: bool = True  # orthogonalise c_attn's q, k and v apart
    wandb: str = None  # a W&B project to mirror log.txt to (rank 0; needs `pip install wandb`); default off


@dataclass
class SampleConfig:
    prompt: str = "Hello, I'm a language model,"  # also the prompt of the samples printed during training
    sample: bool = False  # sample from --init_from (or the newest checkpoint in --log_dir) and exit
    num_samples: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 50
    export: str = None  # write --init_from (or the newest checkpoint) as a transformers folder and exit


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named defaults; flags override them")
    for f in fields(GPTConfig) + fields(TrainConfig) + fields(SampleConfig):
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(f"--{f.name}", type=f.type if f.type in (int, float) else str,
                                metavar=f.name.upper())
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, as for every other bad input
    given = vars(parser.parse_args(argv))
    values = {**PRESETS.get(given.pop("preset", None), {}), **given}
    pick = lambda cls: cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
    # and which fields a flag or the preset set: a model loaded from elsewhere keeps its shape unless one did
    return pick(GPTConfig), pick(TrainConfig), pick(SampleConfig), set(values)


def main(argv=None):
    model_cfg, cfg, sample_cfg, given = parse_args(argv)
    try:
        check_config(model_cfg, cfg, sample_cfg, GPT2_VOCAB)
        if not sample_cfg.sample and sample_cfg.export is None:
            stopped_by = train(cfg, model_cfg, sample_cfg, given)
            if stopped_by:  # exit as the signal would (128 + N): a job script can tell the run is not done
                sys.exit(128 + stopped_by)
            return
        source = cfg.init_from or find_checkpoint(cfg.log_dir)
        if source is None:
            raise UsageError("nothing to load: pass --init_from (gpt2, a folder or a .pt) or a --log_dir "
                             "with checkpoints")
        device = resolve_device(cfg.device)
        model = load_model(source, device)
        if sample_cfg.export:  # the weights as trained (float32), whatever --dtype sampling uses
            import hf_export  # only here: it imports transformers, which training never needs
            print(f"wrote {hf_export.export_hf(model, sample_cfg.export, source)} "
                  "(load with transformers' from_pretrained or pipeline)")
        half = resolve_precision(cfg.dtype, device).autocast_dtype
        if half is not None:
            model.to(half)  # sampling reads every weight once per token: half the bytes, ~2x faster
        if sample_cfg.sample:
            for text in sample_text(model, sample_cfg, seed=cfg.seed, device=device):
                print(f"{text}\n{'-' * 40}")
    except UsageError as e:
        sys.exit(1 if e.every_rank and int(os.environ.get("RANK", 0)) else f"error: {e}")


if __name__ == "__main__":
    # hellaswag.py and memory_plan.py import this file as `train_gpt2`: this module, not a second copy
    sys.modules["train_gpt2"] = sys.modules["__main__"]
    main()
