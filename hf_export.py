"""
transformers' GPT-2 both ways: OpenAI's weights (or a transformers folder) into train_gpt2.py's GPT, and
--export, a train_gpt2.py model as a transformers folder (weights, config, GPT-2's tokenizer, a Hub model
card) that from_pretrained, pipeline() and lm-eval-harness load as they load OpenAI's gpt2. train_gpt2.py
imports this file only for those, so training never needs transformers.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, metadata_load
from tiktoken_ext.openai_public import r50k_pat_str
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.utils import logging as hf_logging

from disk import load_checkpoint
from train_gpt2 import BPE_FILE, EOT, GPT2_VOCAB, UsageError, get_tokenizer

# OpenAI's checkpoints use a Conv1D module whose weight is (in, out); nn.Linear's is (out, in)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_to_ours(sd):
    # transformers < 5 also stores the causal mask as attn.bias / attn.masked_bias buffers
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    return {k: v.t() if k.endswith(_CONV1D) else v for k, v in sd.items()}


HF_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def load_hf(name_or_path):
    """(GPTConfig's fields, our state_dict) of OpenAI's GPT-2 by name (from the HF hub) or of a folder saved
    by transformers."""
    if not os.path.isdir(name_or_path) and name_or_path not in HF_MODELS:
        raise UsageError(f"unknown model '{name_or_path}': use one of {', '.join(HF_MODELS)} "
                         "or a folder saved by transformers")
    if os.path.isdir(name_or_path):
        cfg_file = os.path.join(name_or_path, "config.json")
        if not os.path.isfile(cfg_file) or json.load(open(cfg_file)).get("model_type") != "gpt2":
            raise UsageError(f"'{name_or_path}' is not a GPT-2 checkpoint folder "
                             "(no config.json with model_type 'gpt2')")
    hf_logging.set_verbosity_error()
    try:  # huggingface_hub's own offline (HF_HUB_OFFLINE=1) and proxy (HTTPS_PROXY) handling
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
    except OSError as e:
        raise UsageError(f"could not load '{name_or_path}' ({str(e).splitlines()[0][:200]}); offline? "
                         "pass a local folder saved by transformers' save_pretrained, and set "
                         "HF_HUB_OFFLINE=1 to fail at once") from None
    c = hf.config
    if c.activation_function != "gelu_new":
        raise UsageError(f"'{name_or_path}' uses activation {c.activation_function}; GPT-2 uses gelu_new")
    shape = dict(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                 n_embd=c.n_embd)
    return shape, hf_to_ours(hf.state_dict())


EXPORT_TAG = "gpt2-repro-export"  # in every exported card's tags: marks a folder a later --export may replace


def hf_tokenizer(block_size):
    """GPT-2's tokenizer for transformers, built from the shipped BPE ranks: the same ids as
    get_tokenizer()."""
    get_tokenizer()  # checks BPE_FILE's hash; the converter reads the file unchecked
    converted = TikTokenConverter(vocab_file=str(BPE_FILE), pattern=r50k_pat_str,
                                  extra_special_tokens={"<|endoftext|>": EOT}).converted()
    # the GPT2TokenizerFast class (not a generic one) writes tokenizer_class GPT2Tokenizer, as OpenAI's gpt2
    # folder has, which every transformers version resolves
    return GPT2TokenizerFast(tokenizer_object=converted, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", model_max_length=block_size)


def training_rows(source):
    """(what, value) rows on how the .pt checkpoint `source` was trained: its step and args, and its
    log.txt."""
    ckpt = load_checkpoint(source)
    step, args = ckpt.get("step"), ckpt.get("args") or {}
    if step is None:
        return []  # without the step, neither the tokens nor which log lines are this model's are known
    rows = []
    if "total_batch_size" in args:
        rows.append(("training", f"{step:,} steps x {args['total_batch_size']:,} tokens = "
                                 f"{step * args['total_batch_size']:,} tokens of `{args.get('data')}`, "
                                 f"optimizer {args.get('optimizer', 'adamw')}"))
    log_file = os.path.join(os.path.dirname(source), "log.txt")
    last = {}  # a log goes on past its earlier checkpoints: each stream's last value at or before this step
    if os.path.isfile(log_file):
        with open(log_file) as f:
            for parts in map(str.split, f):
                if len(parts) == 3 and parts[0].isdigit() and int(parts[0]) <= step:
                    last[parts[1]] = (int(parts[0]), parts[2])
    # a run's last eval comes before its last update: say so rather than pass it off as this step's
    when = lambda s: f"at step {s}" + (f", {step - s} update(s) before this checkpoint" if s < step else "")
    if "val" in last:
        rows.append(("val loss", f"{last['val'][1]} {when(last['val'][0])} (log.txt)"))
    if "hella" in last:
        how = "hellaswag.py's: the ending with the lowest mean loss per token"
        rows.append(("HellaSwag acc_norm", f"{last['hella'][1]} {when(last['hella'][0])} (log.txt; {how})"))
    return rows


def model_card(hf, folder, source):
    """The export's README.md, a huggingface_hub ModelCard: the Hub's YAML metadata, then what the model
    is."""
    c = hf.config
    n_params = sum(p.numel() for p in hf.parameters())  # parameters() yields the tied wte/lm_head once
    rows = [("architecture", f"GPT-2: {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, "
                             f"context {c.n_positions} tokens"),
            ("parameters", f"{n_params:,} (the tied embedding and output matrix counted once; "
                           f"vocabulary {c.vocab_size:,})")]
    if source and os.path.isfile(source):
        rows += training_rows(source)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    made = (f"Made with `python train_gpt2.py --init_from {source} --export {folder}`" if source
            else "Made with `hf_export.export_hf`")
    name = Path(folder).name
    data = ModelCardData(library_name="transformers", license="other", pipeline_tag="text-generation",
                         tags=["gpt2", "text-generation", EXPORT_TAG])
    return ModelCard(f"""---
{data.to_yaml()}
---

# {name}

A GPT-2 language model{f" from `{source}`" if source else ""}, exported by gpt2-repro's `train_gpt2.py`.

| | |
| --- | --- |
{table}

{made}.

The tokenizer is GPT-2's, built offline from the project's `gpt2.tiktoken`; `<|endoftext|>` (id {EOT}) is its
bos, eos and unk token and the generation's eos and pad.

```python
from transformers import pipeline
print(pipeline("text-generation", model="{name}")("Hello,", max_new_tokens=32)[0]["generated_text"])
```

License: this project chose none for its weights. OpenAI's weights (`--init_from gpt2`) and the GPT-2 BPE
ranks are OpenAI's, under its Modified MIT license.
""")


def is_export(folder):
    """Whether `folder` holds an earlier export: EXPORT_TAG in its card's tags, read by huggingface_hub."""
    card = Path(folder, "README.md")
    try:
        # metadata_load, not ModelCard.load, which warns on a card without metadata: a line before our error
        return card.is_file() and EXPORT_TAG in (ModelCardData(**(metadata_load(card) or {})).tags or [])
    except Exception:  # another's card fails in many ways (not UTF-8, bad YAML, `tags: 5`): it is not ours
        return False


def export_hf(model, folder, source=None):
    """
    Write `model` as a transformers folder: weights, config, generation config, GPT-2's tokenizer and a model
    card (README.md; from `source`, the checkpoint it was loaded from, when given). An earlier export at
    `folder` is replaced; any other non-empty folder is an error.
    """
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or is_export(folder))):
        raise UsageError(f"--export {folder} exists and is not an earlier export; "
                         "remove it or pick another folder")
    c = model.config
    # n_ctx as OpenAI's configs carry it: transformers ignores it, llama.cpp's convert_hf_to_gguf.py reads it
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, n_positions=c.block_size, n_ctx=c.block_size,
                                    n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, bos_token_id=EOT,
                                    eos_token_id=EOT))
    sd = {k: v.t() if k.endswith(_CONV1D) else v for k, v in model.state_dict().items()}
    for k in ("transformer.wte.weight", "lm_head.weight"):
        sd[k] = sd[k][:GPT2_VOCAB]  # drop the padding rows, which no real token uses
    hf.load_state_dict(sd, strict=False)  # strict=False: older transformers keep attn.bias buffers
    hf.tie_weights()
    # GPT-2 has no pad token; without one generate() warns on every call
    hf.generation_config.pad_token_id = EOT
    # written beside the target and renamed at the end: a failed export leaves no half folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        hf.save_pretrained(tmp)
        hf_tokenizer(c.block_size).save_pretrained(tmp)
        model_card(hf, folder, source).save(tmp / "README.md")
        if folder.exists():
            # an earlier export or an empty folder: a directory cannot be renamed over it
            folder.rename(old)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return folder
