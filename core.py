"""
CORE (Li et al. 2024, the DCLM paper) scored exactly as nanochat scores it (nanochat/core_eval.py and
scripts/base_eval.py at commit 21a7774), so that a number here compares with nanochat's leaderboard: the
22 in-context tasks of its eval bundle, each an accuracy centred by the task's random baseline, and CORE
their mean. nanochat measured OpenAI's GPT-2 at 0.1139 (124M), 0.1849 (350M), 0.2146 (774M), 0.2565 (1.5B).
Importing this file runs nothing.

    python core.py -m gpt2                                  # the bundle is downloaded once, next to this file
    python core.py -m log/model_019073.pt --bundle path/to/eval_bundle
    torchrun --standalone --nproc_per_node=8 core.py -m log # a log dir's newest checkpoint, rows over 8 GPUs
    python core.py -m gpt2 --max_per_task 100 -d cpu        # a quick look, not comparable with the above

It scores in float32 (TF32 matmuls on a GPU), as nanochat scored OpenAI's models; `--dtype bfloat16` is
faster. The last stdout line is JSON, {"core": c, "results": {label: accuracy}, "centered": {label: c}}.
"""

import argparse
import csv
import fcntl
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from devices import resolve_precision
from ranks import on_every_rank
from run_checks import find_checkpoint
from train_gpt2 import EOT, GPT2_VOCAB, UsageError, all_reduce, get_tokenizer, load_model, setup_distributed

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's base_eval.py
CACHE_DIR = Path(__file__).with_name("eval_bundle")
KINDS = ("multiple_choice", "schema", "language_modeling")
# nanochat's CORE of OpenAI's models (dev/estimate_gpt3_core.ipynb; 1.5B is 0.256525 in dev/LEADERBOARD.md)
OPENAI = {"124M": 0.1139, "350M": 0.1849, "774M": 0.2146, "1.5B": 0.2565}
BATCH_TOKENS = 8192
CHUNK_ROWS = 256  # rows tokenized at a time: a task's 10-shot prompts, all at once, are gigabytes of lists


class Task(NamedTuple):
    label: str
    kind: str  # one of KINDS
    shots: int
    delimiter: str  # between a prompt and its continuation
    baseline: float  # the random baseline's accuracy, in percent
    rows: list  # shuffled as nanochat shuffles them, and cut to --max_per_task


# -----------------------------------------------------------------------------
# the bundle


def download_bundle():
    """The cached bundle folder, downloaded from nanochat's URL and unpacked if missing."""
    if (CACHE_DIR / "core.yaml").is_file():
        return CACHE_DIR
    CACHE_DIR.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(CACHE_DIR.parent, os.O_RDONLY)
    try:
        # one process downloads; the other ranks on this machine wait here, then find it unpacked
        fcntl.flock(fd, fcntl.LOCK_EX)
        if (CACHE_DIR / "core.yaml").is_file():
            return CACHE_DIR
        if CACHE_DIR.exists():
            raise UsageError(f"{CACHE_DIR} holds no core.yaml: delete it to download the bundle again")
        # unpacked beside its place and renamed in whole: an interrupted download leaves no half a bundle
        with tempfile.TemporaryDirectory(dir=CACHE_DIR.parent, prefix=".eval_bundle-") as tmp:
            unpacked = Path(tmp) / "unpacked"
            zipped = Path(tmp) / "eval_bundle.zip"
            with urllib.request.urlopen(BUNDLE_URL, timeout=60) as response, open(zipped, "wb") as f:
                size = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, desc=zipped.name, dynamic_ncols=True) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            with zipfile.ZipFile(zipped) as z:
                z.extractall(unpacked)
            if not (unpacked / "eval_bundle" / "core.yaml").is_file():
                raise UsageError(f"{BUNDLE_URL} holds no eval_bundle/core.yaml: pass --bundle with an "
                                 "unpacked bundle (core.yaml, eval_meta_data.csv, eval_data/)")
            os.rename(unpacked / "eval_bundle", CACHE_DIR)
    except (OSError, zipfile.BadZipFile) as e:
        raise UsageError(f"could not download and unpack {BUNDLE_URL} ({e}); offline? pass --bundle with an "
                         "unpacked copy (core.yaml, eval_meta_data.csv, eval_data/)") from None
    finally:
        os.close(fd)
    return CACHE_DIR


def is_text(value):
    # nanochat's templates print any value as str() does: numbers pass, as in its arithmetic tasks
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def check_row(row, kind):
    """Why `row` cannot be scored as a `kind` task, or None if it can."""
    if not isinstance(row, dict):
        return "not a JSON object"
    keys = {"multiple_choice": ("query", "choices", "gold"),
            "schema": ("context_options", "continuation", "gold"),
            "language_modeling": ("context", "continuation")}[kind]
    for key in keys:
        value = row.get(key)
        if key in ("choices", "context_options"):
            if not isinstance(value, list) or not value or not all(map(is_text, value)):
                return f"'{key}' must be a non-empty list of strings"
        elif key == "gold":
            options = row.get("choices", row.get("context_options"))
            if type(value) is not int or not 0 <= value < len(options):
                return f"'gold' must be an index into its {len(options)} options (got {value!r})"
        elif not is_text(value):
            return f"'{key}' must be a string"
    return None


def load_rows(path, kind):
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            problem = check_row(row, kind)
            if problem:
                raise UsageError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    return rows


def load_bundle(bundle=None, max_per_task=None):
    """
    The tasks of core.yaml, in its order. bundle: an unpacked bundle folder (core.yaml, eval_meta_data.csv,
    eval_data/), or None for the cache next to this file (downloaded if missing). Each task's rows are
    shuffled by random.Random(1337), and max_per_task (None or 0: all) keeps the first ones, as nanochat's
    --max-per-task.
    """
    if max_per_task is not None and max_per_task < 0:
        raise UsageError(f"--max_per_task must be >= 0 (got {max_per_task}); 0 means every row")
    folder = download_bundle() if bundle is None else Path(bundle)
    for name in ("core.yaml", "eval_meta_data.csv", "eval_data"):
        if not (folder / name).exists():
            raise UsageError(f"no {name} in '{folder}': pass --bundle an unpacked eval bundle (core.yaml, "
                             "eval_meta_data.csv, eval_data/)")
    try:
        config = yaml.safe_load((folder / "core.yaml").read_text(encoding="utf-8"))
        entries = config["icl_tasks"]
        with open(folder / "eval_meta_data.csv", encoding="utf-8", newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (yaml.YAMLError, TypeError, KeyError, ValueError) as e:
        raise UsageError(f"'{folder}' is not an eval bundle nanochat reads ({type(e).__name__}: {e}): "
                         "core.yaml needs icl_tasks, eval_meta_data.csv 'Eval Task' and 'Random baseline'"
                         ) from None
    tasks = []
    for n, entry in enumerate(entries, start=1):
        try:
            label, kind, uri = entry["label"], entry["icl_task_type"], entry["dataset_uri"]
            shots, delimiter = entry["num_fewshot"][0], entry.get("continuation_delimiter", " ")
        except (TypeError, KeyError, IndexError, AttributeError) as e:
            raise UsageError(f"core.yaml: icl_tasks entry {n} lacks {e} (label, icl_task_type, dataset_uri "
                             "and num_fewshot: [k] are needed)") from None
        if kind not in KINDS:
            raise UsageError(f"core.yaml: task {label} has icl_task_type {kind!r}; CORE knows "
                             f"{', '.join(KINDS)}")
        if label not in baselines or not baselines[label] < 100:
            raise UsageError(f"eval_meta_data.csv has no random baseline below 100 for task {label}")
        path = folder / "eval_data" / uri
        if not path.is_file():
            raise UsageError(f"core.yaml: task {label}'s data {path} is missing: the bundle is incomplete")
        rows = load_rows(path, kind)
        random.Random(1337).shuffle(rows)  # nanochat's order: --max_per_task keeps the same rows as its own
        rows = rows[:max_per_task or None]
        if not rows:
            raise UsageError(f"task {label}: {path} holds no rows")
        if type(shots) is not int or shots < 0:
            raise UsageError(f"core.yaml: task {label}'s num_fewshot must be [k], k >= 0 (got {shots!r})")
        if shots >= len(rows):
            raise UsageError(f"task {label} draws {shots} examples from its other {len(rows) - 1} rows: "
                             f"pass --max_per_task {shots + 1} or more")
        tasks.append(Task(label, kind, shots, delimiter, baselines[label], rows))
    if not tasks:
        raise UsageError(f"{folder / 'core.yaml'} lists no icl_tasks")
    return tasks


# -----------------------------------------------------------------------------
# prompts and their tokens


def fewshot_indices(n, idx, shots):
    """nanochat's draw for row idx of n: random.Random(1234 + idx).sample of the other rows. Sampling
    positions 0..n-2 (row j, or j + 1 from idx on) draws the same rows without a list of n per row."""
    if shots == 0:
        return []
    return [j + (j >= idx) for j in random.Random(1234 + idx).sample(range(n - 1), shots)]


def render(task, idx):
    """nanochat's prompts for row idx (its jinja templates, written out): each example shown whole, then a
    blank line, then the row; one prompt per choice (multiple choice) or context (schema), and the prompt
    without then with the continuation (language modeling)."""
    row, d = task.rows[idx], task.delimiter
    shown = [task.rows[i] for i in fewshot_indices(len(task.rows), idx, task.shots)]
    if task.kind == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shown)
        return [f"{head}{row['query']}{d}{choice}" for choice in row["choices"]]
    if task.kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shown)
        return [f"{head}{context}{d}{row['continuation']}" for context in row["context_options"]]
    # contexts are stripped (some end in spaces), and the prompt without its continuation too: else its
    # trailing space would be a token of its own, where the full prompt merges it into the next word
    head = "".join(f"{str(s['context']).strip()}{d}{s['continuation']}\n\n" for s in shown)
    without = f"{head}{str(row['context']).strip()}{d}"
    return [without.strip(), f"{without}{row['continuation']}"]


def common_length(seqs):
    """How many leading tokens all of seqs share."""
    return next((i for i, column in enumerate(zip(*seqs)) if len(set(column)) > 1), min(map(len, seqs)))


def spans(task, idx, tokens):
    """(tokens, start, end) per sequence that scores row idx, from its prompts' tokens (<|endoftext|> first):
    tokens[start:end] is what the model is scored on."""
    if task.kind == "multiple_choice":  # one question, then each choice from the first token they differ at
        start = common_length(tokens)
        return [(t, start, len(t)) for t in tokens]
    if task.kind == "schema":  # each context, then one continuation: the tokens they all end with
        n = common_length([t[::-1] for t in tokens])
        return [(t, len(t) - n, len(t)) for t in tokens]
    without, full = tokens
    if len(without) >= len(full) or full[:len(without)] != without:
        raise UsageError(f"task {task.label}, row {idx} (after the shuffle): its prompt without the "
                         "continuation does not tokenize as a start of the prompt with it, which nanochat "
                         "refuses too")
    return [(full, len(without), len(full))]


def crop(tokens, start, end, block_size):
    """The last block_size tokens, as nanochat keeps of a longer prompt. Where the scored tokens fill them all
    (nanochat then fails), the first is left unscored: it has no token before it to be predicted from."""
    cut = max(0, len(tokens) - block_size)
    return tokens[cut:], max(start - cut, 1), end - cut


# -----------------------------------------------------------------------------
# scoring


def continuation_scores(model, batch, device, autocast_dtype=None):
    """Per (tokens, start, end) of batch: the mean cross-entropy of tokens[start:end] and whether greedy
    decoding predicts every one of them, in one forward pass over the batch right-padded."""
    T = max(len(t) for t, _, _ in batch)
    x = torch.full((len(batch), T), EOT, dtype=torch.long)
    for b, (t, _, _) in enumerate(batch):
        x[b, :len(t)] = torch.tensor(t)
    start, end = (torch.tensor([s[i] for s in batch]).unsqueeze(1) for i in (1, 2))
    # logit position p predicts token p + 1; padding is never scored and, causal, never seen
    mask = (torch.arange(1, T) >= start) & (torch.arange(1, T) < end)
    x, mask = x.to(device), mask.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, _ = model(x)
    # padded vocab entries (50257..) are no token: nanochat's GPT-2 has none to predict
    logits = logits[:, :-1][mask][:, :GPT2_VOCAB].float()
    targets = x[:, 1:][mask]
    per_token = torch.stack([F.cross_entropy(logits, targets, reduction="none"),
                             (logits.argmax(dim=1) != targets).float()], dim=1)
    sums = torch.zeros(len(batch), 2, device=device).index_add_(0, mask.nonzero()[:, 0], per_token)
    mean_loss, all_hit = (sums[:, 0] / mask.sum(dim=1)).tolist(), (sums[:, 1] == 0).tolist()
    return list(zip(mean_loss, all_hit))


def score_rows(model, task, indices, device, batch_tokens=BATCH_TOKENS, autocast_dtype=None,
               distributed=False, progress=False, between_batches=None):
    """
    Whether `model` (our GPT, uncompiled: every batch has its own shape) gets each of task.rows[i] for i in
    indices right: multiple choice and schema by the lowest mean loss over the continuation, language
    modeling by an exact greedy match. Each forward holds at most batch_tokens tokens (one sequence at least).
    distributed: every rank runs as many forwards as the rank with the most, as FSDP needs.
    between_batches(), if given, runs before each forward and may raise to end the eval there.
    """
    block_size, encode = model.config.block_size, get_tokenizer().encode_ordinary_batch
    chunks = [indices[i:i + CHUNK_ROWS] for i in range(0, len(indices), CHUNK_ROWS)]
    n_chunks = agree_max(len(chunks), device, distributed)
    right = []
    with tqdm(total=len(indices), desc=task.label, unit="row", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for c in range(n_chunks):
            chunk = chunks[c] if c < len(chunks) else []
            prompts = [render(task, idx) for idx in chunk]
            flat = iter(encode([p for ps in prompts for p in ps]))
            seqs = []  # (row in chunk, option, tokens, start, end)
            for r, (idx, ps) in enumerate(zip(chunk, prompts)):
                tokens = [[EOT] + next(flat) for _ in ps]  # <|endoftext|> as nanochat's BOS
                seqs += [(r, o, *crop(*span, block_size)) for o, span in enumerate(spans(task, idx, tokens))]
            # longest first: each batch holds similar lengths, so little of batch_tokens goes to padding
            seqs.sort(key=lambda s: len(s[2]), reverse=True)
            batches, i = [], 0
            while i < len(seqs):
                n = max(1, batch_tokens // len(seqs[i][2]))
                batches.append(seqs[i:i + n])
                i += n
            scores = [{} for _ in chunk]
            for b in range(agree_max(len(batches), device, distributed)):
                if between_batches is not None:
                    between_batches()
                if b >= len(batches):
                    model(torch.zeros((1, 1), dtype=torch.long, device=device))  # for the other ranks' sake
                    continue
                out = continuation_scores(model, [s[2:] for s in batches[b]], device, autocast_dtype)
                for (r, o, *_), score in zip(batches[b], out):
                    scores[r][o] = score
            for idx, row_scores in zip(chunk, scores):
                if task.kind == "language_modeling":
                    right.append(row_scores[0][1])
                else:
                    # min() and index() as nanochat's: the first of equal losses wins, and a NaN (a choice
                    # with no token past those all choices share) wins only if it is the first
                    losses = [row_scores[o][0] for o in range(len(row_scores))]
                    right.append(losses.index(min(losses)) == task.rows[idx]["gold"])
            bar.update(len(chunk))
    return right


def agree_max(n, device, distributed):
    """The largest n of all ranks: under FSDP every forward is a collective that all ranks must run."""
    if not distributed:
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def centered(accuracy, baseline):
    """The accuracy rescaled so that the random baseline (percent) scores 0 and a perfect score 1."""
    return (accuracy - 0.01 * baseline) / (1 - 0.01 * baseline)


def evaluate(model, tasks, device, rank=0, world=1, distributed=False, batch_tokens=BATCH_TOKENS,
             autocast_dtype=None, progress=False, between_batches=None, say=None):
    """
    CORE of `model` on `tasks`, each rank scoring rows rank::world of every task (as nanochat strides them):
    {"core": the mean centred accuracy, "results": {label: accuracy}, "centered": {label: centred accuracy}},
    the same on every rank. say(line), if given, gets a line per task as it ends.
    """
    was_training = model.training
    model.eval()
    results, centred = {}, {}
    try:
        with torch.no_grad():  # not inference_mode: FSDP2 would gather its weights as inference tensors
            for task in tasks:
                t0 = time.time()
                right = score_rows(model, task, range(rank, len(task.rows), world), device, batch_tokens,
                                   autocast_dtype, distributed, progress, between_batches)
                counts = all_reduce(torch.tensor([sum(right), len(right)], device=device), distributed)
                correct, total = counts.tolist()
                # a float32 mean, as nanochat's: the same rows right give the same bits
                accuracy = (torch.tensor(correct, dtype=torch.float32) / total).item()
                results[task.label] = accuracy
                centred[task.label] = centered(accuracy, task.baseline)
                if say is not None:
                    say(f"{task.label:<33} {task.shots:>2}-shot {task.kind:<17} accuracy {accuracy:.4f} | "
                        f"centered {centred[task.label]:7.4f} | {time.time() - t0:6.1f}s")
    finally:
        model.train(was_training)
    return {"core": sum(centred.values()) / len(centred), "results": results, "centered": centred}


def openai_line():
    return "OpenAI's GPT-2 as nanochat measured it: " + " | ".join(f"{k} {v:.4f}" for k, v in OPENAI.items())


# -----------------------------------------------------------------------------
# during a training run


def load_for_run(bundle, max_per_task, master, distributed):
    """The tasks on every rank, or None on every rank (with a line on rank 0) if any rank cannot load them."""
    try:
        return on_every_rank(lambda: load_bundle(bundle, max_per_task), distributed)
    except UsageError as e:
        if master:
            print(f"CORE skipped: {e}", flush=True)
        return None


# -----------------------------------------------------------------------------
# command line


def resolve_model(name):
    """-m as load_model takes it, a log dir standing for its newest checkpoint."""
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        newest = find_checkpoint(name)
        if newest is None:
            raise UsageError(f"'{name}' holds neither a transformers model (config.json) nor checkpoints "
                             "(model_*.pt): pass gpt2 ... gpt2-xl, a transformers folder, a .pt or a log dir")
        return newest
    return name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="gpt2",
                        help="gpt2 ... gpt2-xl, a folder saved by transformers, a train_gpt2.py .pt "
                             "checkpoint, or a log dir (its newest checkpoint)")
    parser.add_argument("-d", "--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--bundle", default=None,
                        help="an unpacked eval bundle: core.yaml, eval_meta_data.csv, eval_data/ (default: "
                             f"download nanochat's to {CACHE_DIR.name}/ next to this script)")
    parser.add_argument("--max_per_task", type=int, default=None,
                        help="score the first N rows of each task after nanochat's shuffle (default all)")
    parser.add_argument("--batch_tokens", type=int, default=BATCH_TOKENS,
                        help="tokens per forward pass, padding included (one sequence at least)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                        help="float32 (TF32 matmuls on a GPU), as nanochat scored OpenAI's GPT-2; bfloat16 "
                             "or float16 autocast, or auto (train_gpt2.py's choice), are faster on a GPU")
    args = parser.parse_args(argv)
    distributed = False
    try:
        if args.batch_tokens < 1:
            raise UsageError(f"--batch_tokens must be >= 1 (got {args.batch_tokens})")
        distributed, rank, world, device = setup_distributed(args.device)
        say = print if rank == 0 else (lambda *a, **k: None)
        # the bundle before the model: a missing bundle fails fast
        tasks = on_every_rank(lambda: load_bundle(args.bundle, args.max_per_task), distributed)
        source = on_every_rank(lambda: resolve_model(args.model), distributed)
        model = on_every_rank(lambda: load_model(source, device), distributed)
        precision = resolve_precision(args.dtype, device)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32, as nanochat's base_eval.py (compute_init)
        rows = sum(len(t.rows) for t in tasks)
        say(f"{source}: {model.num_params():,} parameters | {world} process(es) on {device} | "
            f"{precision.reason} | {len(tasks)} tasks, {rows:,} rows", flush=True)
        t0 = time.time()
        result = evaluate(model, tasks, device, rank, world, distributed, args.batch_tokens,
                          precision.autocast_dtype, progress=rank == 0,
                          say=lambda line: say(line, flush=True))
        cut = f" (the first {args.max_per_task} rows of each task)" if args.max_per_task else ""
        say(f"{source}: CORE {result['core']:.4f}{cut} in {time.time() - t0:.0f}s")
        say(openai_line())
        say(json.dumps(result))
    except UsageError as e:
        sys.exit(1 if e.every_rank and int(os.environ.get("RANK", 0)) else f"error: {e}")
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
