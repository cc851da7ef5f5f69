"""
GPT-2 (124M) from scratch: the model, OpenAI's weights, the data loader, the optimizer and the
training loop, in the order the data flows. Importing this file runs nothing; `main()` does.

    python train_gpt2.py --preset shakespeare                  # small GPT on a laptop CPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # GPT-2 124M on FineWeb-Edu 10B
    python train_gpt2.py --init_from gpt2 --sample "Hello, I'm a language model,"
    python train_gpt2.py --init_from log/model_19073.pt --export gpt2_hf
"""

import functools
import inspect
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiktoken_ext.openai_public import r50k_pat_str

EOT = 50256  # <|endoftext|>: the document separator in every shard
GPT2_VOCAB = 50257  # real token ids; vocab_size 50304 pads to a multiple of 64 for faster matmuls
BPE_FILE = Path(__file__).with_name("gpt2.tiktoken")
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
HF_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class UsageError(Exception):
    """Bad input from the user: every script prints it as one line and exits non-zero."""


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    # Built from the shipped BPE ranks, not tiktoken.get_encoding("gpt2"), which downloads them:
    # the same ids with or without network, on every machine and in every script.
    ranks = tiktoken.load.load_tiktoken_bpe(str(BPE_FILE), expected_hash=BPE_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=GPT2_VOCAB)


# -----------------------------------------------------------------------------
# the model


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
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        causal = True
        if kv_cache is not None:
            # kv_cache is this layer's [k, v] from earlier positions (or [None, None]): generation
            # then feeds one new token at a time, which may attend to every cached position.
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
            raise UsageError(f"sequence of {past + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_cache is None else kv_cache[i])
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_path):
        """OpenAI's GPT-2 from the HF hub by name, or from a local folder saved by transformers."""
        if not os.path.isdir(name_or_path) and name_or_path not in HF_MODELS:
            raise UsageError(f"unknown model '{name_or_path}': use one of {', '.join(HF_MODELS)} "
                             "or a folder saved by transformers")
        if os.path.isdir(name_or_path):
            cfg_file = os.path.join(name_or_path, "config.json")
            if not os.path.isfile(cfg_file) or json.load(open(cfg_file)).get("model_type") != "gpt2":
                raise UsageError(f"'{name_or_path}' is not a GPT-2 checkpoint folder "
                                 "(no config.json with model_type 'gpt2')")
        from transformers import GPT2LMHeadModel  # only here, so training never needs transformers
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        except OSError as e:
            raise UsageError(f"could not load '{name_or_path}' ({str(e).splitlines()[0][:200]}); "
                             "offline? pass a local folder saved by transformers' save_pretrained") from None
        c = hf.config
        if c.activation_function != "gelu_new":
            raise UsageError(f"'{name_or_path}' uses activation {c.activation_function}; GPT-2 uses gelu_new")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd)
        model = cls(config)
        model.load_state_dict(hf_to_ours(hf.state_dict()))
        return model


# OpenAI's checkpoints use a Conv1D module whose weight is (in, out); nn.Linear's is (out, in)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_to_ours(sd):
    # transformers < 5 also stores the causal mask as attn.bias / attn.masked_bias buffers
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    return {k: v.t() if k.endswith(_CONV1D) else v for k, v in sd.items()}


def export_hf(model, folder):
    """Write `model` as a folder that transformers.GPT2LMHeadModel.from_pretrained loads."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, bos_token_id=EOT, eos_token_id=EOT))
    sd = {k: v.t() if k.endswith(_CONV1D) else v for k, v in model.state_dict().items()}
    for k in ("transformer.wte.weight", "lm_head.weight"):
        sd[k] = sd[k][:GPT2_VOCAB]  # drop the padding rows, which no real token uses
    hf.load_state_dict(sd, strict=False)  # strict=False: older transformers keep attn.bias buffers
    hf.tie_weights()
    hf.save_pretrained(folder)
    return folder


# -----------------------------------------------------------------------------
# sampling


@torch.no_grad()
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
            probs = F.softmax(logits / temperature, dim=-1)
            topk_probs, topk_ids = torch.topk(probs, min(top_k or GPT2_VOCAB, GPT2_VOCAB), dim=-1)
            choice = torch.multinomial(topk_probs, 1, generator=generator)
            next_id = torch.gather(topk_ids, -1, choice)
        idx = torch.cat([idx, next_id], dim=1)
    model.train(was_training)
    return idx


def sample_text(model, prompt, num_samples=4, max_new_tokens=32, temperature=1.0, top_k=50, seed=42, device="cpu"):
    enc = get_tokenizer()
    tokens = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    idx = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return [enc.decode(row) for row in out.tolist()]


# -----------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path, device="cpu"):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint '{path}' does not exist") from None
    except Exception as e:
        raise UsageError(f"checkpoint '{path}' is corrupt or not a train_gpt2.py checkpoint "
                         f"({type(e).__name__}); delete it or pass another") from None


def load_model(name_or_path, device="cpu"):
    """Our .pt checkpoint, an HF GPT-2 name (gpt2 ... gpt2-xl) or a folder saved by transformers."""
    if os.path.isfile(name_or_path):
        ckpt = load_checkpoint(name_or_path, device)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            raise UsageError(f"'{name_or_path}' is not a train_gpt2.py checkpoint (no model/config entries)")
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    else:
        model = GPT.from_pretrained(name_or_path)
    return model.to(device)
