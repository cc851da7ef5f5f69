"""
HellaSwag (Zellers et al. 2019) in completion style: the model reads a context and we ask which of
4 endings it finds least surprising. `acc` picks the ending with the lowest summed cross-entropy,
`acc_norm` the lowest mean per token; OpenAI's GPT-2 124M scores acc_norm 0.2955, GPT-3 124M 0.337.
The same evaluate() runs inside train_gpt2.py every eval interval (evaluate_ranks). Importing this file
runs nothing.

    python hellaswag.py -m gpt2                                   # the baseline to beat
    python hellaswag.py -m log/model_019073.pt --data path/to/hellaswag_val.jsonl
    python hellaswag.py -m gpt2 --limit 200 -d cpu                # a quick look

It scores in float32 (TF32 matmuls on a GPU), as build-nanogpt scored OpenAI's 0.2955; `--dtype bfloat16` is
faster on a GPU, and close endings may then flip.

The last stdout line is JSON, {"examples": N, "acc": a, "acc_norm": b}, for scripts to read.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from devices import resolve_device, resolve_precision
from ranks import on_every_rank
from train_gpt2 import GPT2_VOCAB, UsageError, all_reduce, get_tokenizer, load_model

SPLITS = ("train", "val", "test")
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
CACHE_DIR = Path(__file__).with_name("hellaswag")
# Only val's hash is pinned: it was checked against a copy of the file. train and test are
# downloaded unchecked, since we have no verified copy of them to take a hash from.
SHA256 = {"val": "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"}

# -----------------------------------------------------------------------------
# data


def download(split):
    """The cached path of hellaswag_{split}.jsonl, downloading it from rowanz/hellaswag if missing."""
    path = CACHE_DIR / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    url = DATA_URL.format(split=split)
    CACHE_DIR.mkdir(exist_ok=True)
    # a private temp file, renamed into place only when complete and verified: an interrupted
    # download, or DDP ranks downloading at the same time, never leave a half-written cache file
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, f)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        if split in SHA256 and digest != SHA256[split]:
            raise UsageError(f"{url} has sha256 {digest}, expected {SHA256[split]}; "
                             f"pass --data with a verified copy of hellaswag_{split}.jsonl")
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"could not download {url} ({e}); offline? pass --data with a local "
                         f"copy of hellaswag_{split}.jsonl or the folder holding it") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def check_example(ex):
    """Why `ex` cannot be scored, or None if it can."""
    if not isinstance(ex, dict):
        return "not a JSON object"
    if not isinstance(ex.get("ctx"), str) or not ex["ctx"]:
        return "'ctx' must be a non-empty string"  # the first ending token needs a token before it
    endings = ex.get("endings")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        return "'endings' must be a list of 4 strings"
    if type(ex.get("label")) is not int or not 0 <= ex["label"] <= 3:
        return f"'label' must be an integer 0..3 (got {ex.get('label')!r})"
    return None


def load_examples(split="val", data=None, limit=None):
    """
    HellaSwag examples as dicts (ctx, endings, label, ...), validated. data: None for the cache
    folder next to this file (downloaded if missing), a .jsonl file, or a folder holding
    hellaswag_{split}.jsonl. limit: the first `limit` examples; None or 0 for all.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 0:
        raise UsageError(f"limit must be >= 0 (got {limit}); 0 means all examples")
    if data is None:
        path = download(split)
    else:
        path = Path(data)
        if path.is_dir():
            path = path / f"hellaswag_{split}.jsonl"
        if not path.is_file():
            raise UsageError(f"no HellaSwag data at '{path}': pass --data with a hellaswag_{split}.jsonl "
                             "file or the folder holding it")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit and len(examples) == limit:
                break
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            problem = check_example(ex)
            if problem:
                raise UsageError(f"{path}:{lineno}: {problem}")
            examples.append(ex)
    if not examples:
        raise UsageError(f"{path} holds no examples")
    return examples


def ending_tokens(example):
    # the leading space makes the ending's first word the same token as mid-sentence, as GPT-2 saw it
    return [get_tokenizer().encode_ordinary(" " + ending) for ending in example["endings"]]


def fit_to_block(examples, block_size):
    """(the examples a model of block_size can score, a one-line note on the ones it cannot, or None): every
    ending token is scored after at least one token of context."""
    kept = [ex for ex in examples if max(map(len, ending_tokens(ex))) < block_size]
    if len(kept) == len(examples):
        return kept, None
    return kept, (f"{len(examples) - len(kept)} of {len(examples)} HellaSwag examples left out: an ending of "
                  f"{block_size} tokens or more leaves a block_size {block_size} model no context "
                  "to score it after")


def render_example(example, block_size=None):
    """
    tokens, mask: LongTensors (4, L), one row per ending: the context's tokens, then the ending's, each row
    cut on its own to its last block_size tokens and right-padded with 0s to the longest; mask is 1 on the
    ending's tokens.
    label: int.
    """
    ctx = get_tokenizer().encode_ordinary(example["ctx"])
    endings = ending_tokens(example)
    if block_size is not None and max(map(len, endings)) >= block_size:
        raise UsageError(f"HellaSwag example {example.get('ind', '')} has an ending too long for block_size "
                         f"{block_size}: leave it out with fit_to_block")
    rows = [(ctx + ending)[-block_size:] if block_size else ctx + ending for ending in endings]
    tokens = torch.zeros((4, max(map(len, rows))), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, (row, ending) in enumerate(zip(rows, endings)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(row) - len(ending):len(row)] = 1
    return tokens, mask, example["label"]


# -----------------------------------------------------------------------------
# scoring


def ending_losses(model, tokens, mask, autocast_dtype=None):
    """Sum and mean cross-entropy (float32, shape (rows,)) of the masked tokens in each row of tokens
    (rows, T)."""
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, _ = model(tokens)
    # position t predicts token t+1. Only the ending tokens' losses are needed: taking just their
    # logits (a third of the rows) makes the softmax over the vocab cheaper. Padded vocab entries
    # (50257..) are no real token and take no probability mass. The softmax runs in float32, but under
    # half-precision autocast the logits were already rounded by lm_head (70.1 is stored as 70.0).
    mask = mask[:, 1:].bool()
    scored = F.cross_entropy(logits[:, :-1][mask][:, :GPT2_VOCAB].float(), tokens[:, 1:][mask],
                             reduction="none")
    losses = torch.zeros(mask.shape, dtype=torch.float32, device=tokens.device).masked_scatter_(mask, scored)
    sum_loss = losses.sum(dim=1)
    return sum_loss, sum_loss / mask.sum(dim=1)


def evaluate(model, examples, device, batch_size=16, rank=0, world_size=1, autocast_dtype=None,
             progress=False, between_batches=None):
    """
    Score examples[rank::world_size] with `model` (our GPT: model(idx) -> (logits, loss)), batch_size
    examples (4 rows each) per forward. Returns this rank's counts (examples, correct by lowest sum
    loss, correct by lowest mean loss) for the caller to all-reduce. Pass the model without
    torch.compile: every batch has its own length, which would recompile the graph again and again.
    between_batches(), if given, runs on every rank before each batch and may raise to end the eval there.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1 (got {batch_size})")
    was_training = model.training
    model.eval()
    # a model with a shorter context than an example (a small test model: GPT-2's 1024 fits them all) reads,
    # per ending, the ending and as much of the context before it as fits
    rendered = [render_example(ex, model.config.block_size) for ex in examples[rank::world_size]]
    # longest first, so each batch holds similar lengths and little compute goes to padding; the
    # first batch is the largest, so an out-of-memory batch_size fails at once, not at the end
    order = sorted(range(len(rendered)), key=lambda i: rendered[i][0].size(1), reverse=True)
    num_examples = num_correct = num_correct_norm = 0
    bar = tqdm(total=len(rendered), desc="hellaswag", unit="ex", disable=not progress, dynamic_ncols=True)
    # every rank runs as many forwards as the rank with the most examples: under FSDP each one is a collective
    n_batches = math.ceil(math.ceil(len(examples) / world_size) / batch_size)
    with torch.no_grad():  # not inference_mode: FSDP2 would gather its weights as inference tensors
        for start in range(0, n_batches * batch_size, batch_size):
            if between_batches is not None:
                between_batches()
            batch = [rendered[i] for i in order[start:start + batch_size]]
            if not batch:
                model(torch.zeros((1, 1), dtype=torch.long, device=device))  # for the other ranks' sake
                continue
            # right padding is safe: under causal attention no earlier position sees it, and the
            # mask leaves it out of the losses
            T = max(t.size(1) for t, _, _ in batch)
            tokens = torch.zeros((4 * len(batch), T), dtype=torch.long)
            mask = torch.zeros((4 * len(batch), T), dtype=torch.long)
            for j, (t, m, _) in enumerate(batch):
                tokens[4 * j:4 * j + 4, :t.size(1)] = t
                mask[4 * j:4 * j + 4, :m.size(1)] = m
            labels = torch.tensor([label for _, _, label in batch], device=device)
            sum_loss, mean_loss = ending_losses(model, tokens.to(device), mask.to(device), autocast_dtype)
            num_examples += len(batch)
            num_correct += (sum_loss.view(-1, 4).argmin(dim=1) == labels).sum().item()
            num_correct_norm += (mean_loss.view(-1, 4).argmin(dim=1) == labels).sum().item()
            bar.set_postfix(acc_norm=f"{num_correct_norm / num_examples:.4f}", refresh=False)
            bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return num_examples, num_correct, num_correct_norm


# -----------------------------------------------------------------------------
# during a training run


def load_for_run(data, block_size, master, distributed):
    """The val examples that fit block_size on every rank, or None on every rank if any rank lacks them."""
    try:
        examples = on_every_rank(lambda: load_examples("val", data=data), distributed)
    except UsageError as e:
        if master:
            print(f"HellaSwag skipped: {e}", flush=True)
        return None
    examples, note = fit_to_block(examples, block_size)
    if note and master:
        print(note, flush=True)
    return examples or None


def evaluate_ranks(raw_model, examples, rank, world, device, precision, distributed, between_batches=None):
    """(correct by acc_norm, examples) over all ranks, each scoring its share with the uncompiled model."""
    with torch.compiler.set_stance("force_eager"):  # under FSDP the blocks are compiled in place
        n, _, n_norm = evaluate(raw_model, examples, device, rank=rank, world_size=world,
                                autocast_dtype=precision.autocast_dtype, between_batches=between_batches)
    counts = all_reduce(torch.tensor([n_norm, n], dtype=torch.long, device=device), distributed)
    return tuple(counts.tolist())


def run_line(correct, total, precision):
    # scored under the run's autocast, as build-nanogpt's run did; this script scores a checkpoint in float32
    autocast = f" ({precision.dtype} autocast)" if precision.autocast_dtype else ""
    return f"HellaSwag acc_norm {correct}/{total} = {correct / total:.4f}{autocast}"


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="gpt2",
                        help="gpt2 ... gpt2-xl, a folder saved by transformers, "
                             "or a train_gpt2.py .pt checkpoint")
    parser.add_argument("-d", "--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--data", default=None,
                        help="a .jsonl file or a folder holding hellaswag_{split}.jsonl "
                             f"(default: download to {CACHE_DIR.name}/ next to this script)")
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--batch_size", type=int, default=16, help="examples per forward pass (4 rows each)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                        help="float32 (TF32 matmuls on a GPU), as OpenAI's 0.2955 was scored; bfloat16 or "
                             "float16 autocast, or auto (train_gpt2.py's choice), are faster on a GPU")
    args = parser.parse_args(argv)
    try:
        examples = load_examples(args.split, args.data, args.limit)  # before the model: bad data fails fast
        device = resolve_device(args.device)
        model = load_model(args.model, device)
        examples, note = fit_to_block(examples, model.config.block_size)
        if note:
            print(note)
        if not examples:
            raise UsageError(f"no example left to score at block_size {model.config.block_size}")
        precision = resolve_precision(args.dtype, device)  # no GradScaler, if fp16: nothing is backpropagated
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32, as build-nanogpt's hellaswag.py
        t0 = time.time()
        n, correct, correct_norm = evaluate(model, examples, device, args.batch_size,
                                            autocast_dtype=precision.autocast_dtype, progress=True)
        dt = time.time() - t0
    except UsageError as e:
        sys.exit(f"error: {e}")
    print(f"{args.model} on HellaSwag {args.split}: {n} examples in {dt:.1f}s ({n / dt:.1f}/s on {device}, "
          f"{precision.reason})")
    print(f"acc {correct / n:.4f}  acc_norm {correct_norm / n:.4f}")
    print(json.dumps({"examples": n, "acc": correct / n, "acc_norm": correct_norm / n}))


if __name__ == "__main__":
    main()
