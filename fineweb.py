"""
FineWeb-Edu (or any text) -> the GPT-2 token shards that train_gpt2.py trains on.

Every document becomes [EOT] + its GPT-2 tokens (empty documents are skipped and counted), and the
stream of tokens is cut into .npy shards of exactly --shard_size uint16 tokens, the last one shorter;
a document may run on into the next shard. Shard 0 is the validation split:

    edu_fineweb10B/edufineweb_val_000000.npy
    edu_fineweb10B/edufineweb_train_000001.npy
    ...
    edu_fineweb10B/edufineweb_meta.json    source, tokenizer, shard sizes, document counts

    python fineweb.py                       # FineWeb-Edu sample-10BT: ~10B tokens, ~20 GB of shards
    python fineweb.py --streaming           # the same, never keeping the dataset on disk
    python fineweb.py --input input.txt --output_dir shakespeare --prefix shakespeare --shard_size 100000
    python fineweb.py --download fineweb10B --shards 9   # kjj0's ready-made llm.c .bin shards, no tokenizing
    python fineweb.py --input ../shared/data/gutenberg/gutenberg_books.jsonl \\
                      --output_dir gutenberg --prefix gutenberg --shard_size 10000000

--input takes files or globs: .txt (one document per file), .jsonl (one per line, in --text_field)
and .parquet (one per row). Killed or interrupted, rerun the same command: it continues after the
last complete shard and writes the same bytes an uninterrupted run would have written.

--download NAME fetches instead the shards, already tokenized, that modded-nanogpt's data/cached_NAME.py
fetch (fineweb10B, finewebedu10B or fineweb100B): the val shard and the first --shards train shards of 100M
tokens, into ./NAME/, for --data NAME. A rerun skips the shards already there, checked, and fetches the rest.
"""

import argparse
import glob
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import deque
from itertools import islice

import numpy as np
from tqdm import tqdm

from bin_shards import HEADER_BYTES, open_bin
from disk import write_atomically
from train_gpt2 import EOT, UsageError, get_tokenizer

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_NAME = "sample-10BT"
BATCH_CHARS = 1 << 20  # text per worker task: IPC cost is noise next to encoding 1M chars, yet small
                       # enough to balance
EOT_ID = np.array([EOT], dtype=np.uint32)
TASKS_PER_WORKER = 2  # tasks queued per worker: keeps every core busy while bounding memory

# -----------------------------------------------------------------------------
# documents: one string at a time, in a fixed order, never the whole dataset in memory


def expand_inputs(patterns):
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UsageError(f"no file matches --input '{pattern}'")
        for path in matches:
            if os.path.isdir(path):
                raise UsageError(f"--input '{path}' is a folder; pass its files, e.g. '{path}/*.jsonl'")
            if not os.path.isfile(path):
                raise UsageError(f"input file '{path}' does not exist")
            if os.path.splitext(path)[1] not in READERS:
                raise UsageError(f"'{path}': --input takes .txt, .jsonl or .parquet files")
            paths.append(os.path.abspath(path))
    return paths


def read_txt(path, text_field):
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as written
            yield f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_jsonl(path, text_field):
    with open(path, "rb") as f:  # bytes: lines split on \n only, as JSON Lines defines them
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # a blank line (typically the last one) holds no document
            where = f"{path}, line {lineno}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            except UnicodeDecodeError:
                raise UsageError(f"{where}: not UTF-8") from None
            if not isinstance(doc, dict):
                raise UsageError(f"{where}: not a JSON object")
            if text_field not in doc:
                raise UsageError(f"{where}: no field '{text_field}' (it has {', '.join(doc) or 'none'}); "
                                 "name the text field with --text_field")
            if not isinstance(doc[text_field], str):
                raise UsageError(f"{where}: field '{text_field}' is {type(doc[text_field]).__name__}, "
                                 "not a string")
            yield doc[text_field]


def read_parquet(path, text_field):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise UsageError(f"{path} is not a parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise UsageError(f"{path}: no column '{text_field}' (it has {', '.join(pf.schema_arrow.names)}); "
                         "name the text column with --text_field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):  # a row group at a time, never the whole file
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise UsageError(f"{path}, row {row}: '{text_field}' is {type(text).__name__}, not a string")
            row += 1
            yield text


READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".parquet": read_parquet}


def local_documents(paths, text_field, skip=0):
    docs = (text for path in paths for text in READERS[os.path.splitext(path)[1]](path, text_field))
    return islice(docs, skip, None)


def hf_documents(dataset, name, split, text_field, streaming, skip=0):
    import datasets  # under HF_HUB_OFFLINE=1 it takes the cache as it is, without retrying an unreachable hub
    try:
        ds = datasets.load_dataset(dataset, name=name, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown name, bad config or split: datasets raises many types
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"could not load dataset '{dataset}' name={name} split={split} "
                         f"({type(e).__name__}: {first_line}); offline? pass local files with --input, "
                         "and set HF_HUB_OFFLINE=1 to fail at once") from None
    if ds.column_names is not None and text_field not in ds.column_names:
        raise UsageError(f"dataset '{dataset}' has no column '{text_field}' "
                         f"(it has {', '.join(ds.column_names)}); name the text column with --text_field")
    # skip(): a map-style dataset jumps straight to the row; a streaming one still reads past the rows
    ds = ds.select_columns([text_field]).skip(skip)
    row = skip
    for batch in ds.iter(batch_size=1000):
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise UsageError(f"dataset '{dataset}', row {row}: '{text_field}' is {type(text).__name__}, "
                                 "not a string")
            row += 1
            yield text


def source_of(args, paths):
    # What the shards were made from: a rerun only continues an output folder made from the same source.
    if paths:
        files = [{"path": p, "bytes": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns} for p in paths]
        return {"input": files, "text_field": args.text_field}
    return {"dataset": args.dataset, "name": args.name, "split": args.split, "text_field": args.text_field}


# -----------------------------------------------------------------------------
# tokenization: batches of documents, encoded in worker processes, back in source order


def batches(docs):
    batch, chars = [], 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize(texts):
    """One batch of documents -> their [EOT] + tokens back to back (uint16), and each one's length (0 if
    empty)."""
    enc = get_tokenizer()  # cached: built once per process
    pieces, lengths = [], []
    for text in texts:
        if not text:
            lengths.append(0)
            continue
        try:
            # encode_ordinary's ids (no special token allowed, "<|endoftext|>" in the text is plain text),
            # straight into an array: no list of Python ints to build and convert, ~15% faster
            ids = enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates, which encode_ordinary replaces with U+FFFD
            ids = np.array(enc.encode_ordinary(text), dtype=np.uint32)
        pieces += [EOT_ID, ids]
        lengths.append(len(ids) + 1)
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint32)
    assert tokens.size == 0 or tokens.max() < 2**16, "a token id does not fit in uint16"
    return tokens.astype(np.uint16), lengths


def ignore_sigint():
    # Ctrl-C reaches the whole process group: only the main process should react (and clean up)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def tokenized(docs, num_proc):
    """tokenize() of each batch of docs, in order. At most TASKS_PER_WORKER batches per worker are
    in flight: Pool.imap would read the whole source into its task queue, so we feed it by hand."""
    work = batches(docs)
    if num_proc == 1:
        yield from map(tokenize, work)
        return
    with multiprocessing.Pool(num_proc, initializer=ignore_sigint) as pool:
        pending = deque(pool.apply_async(tokenize, (b,)) for b in islice(work, TASKS_PER_WORKER * num_proc))
        while pending:
            result = pending.popleft().get()
            batch = next(work, None)  # refill before handing the result on, so the workers never wait for us
            if batch is not None:
                pending.append(pool.apply_async(tokenize, (batch,)))
            yield result


# -----------------------------------------------------------------------------
# shards: cut the token stream into shards, each written whole or not at all


def cut_shards(results, shard_size, document=0, token=0):
    """Pack the documents' tokens into shards of exactly shard_size tokens, the last one shorter.
    `results` are tokenize() outputs; a resumed run passes those from document `document` on and skips
    the first `token` tokens of that document, which the last complete shard already holds.
    Yields (tokens, documents starting in this shard, next_document, next_token, is_last), where
    (next_document, next_token) is where the next shard starts: a document index counting empty
    documents, and how many of that document's tokens (its EOT first) are in earlier shards.
    The yielded array is reused: save it before asking for the next one."""
    buf = np.empty(shard_size, dtype=np.uint16)  # the only shard in memory
    fill = docs = 0
    for tokens, lengths in results:
        start = 0
        for n in lengths:
            pos, token = token, 0  # only the first document of a resumed run starts part way
            while pos < n:
                if fill == shard_size:  # full: written once more tokens arrive, so only the last shard
                                        # is_last
                    yield buf, docs, document, pos, False
                    fill = docs = 0
                docs += pos == 0
                k = min(shard_size - fill, n - pos)
                buf[fill:fill + k] = tokens[start + pos:start + pos + k]
                fill += k
                pos += k
            start += n
            document += 1
    if fill:
        yield buf[:fill], docs, document, 0, True


def shard_name(prefix, index):
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def meta_path(output_dir, prefix):
    return os.path.join(output_dir, f"{prefix}_meta.json")


def read_meta(output_dir, prefix):
    """The metadata beside the shards, or None where there is none."""
    path = meta_path(output_dir, prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        raise UsageError(f"{path} is corrupt; pass --overwrite to rebuild the shards") from None


def save_meta(output_dir, prefix, meta):
    write_atomically(meta_path(output_dir, prefix), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def shard_files(output_dir, prefix, split):
    """Paths of the complete shards of `split` ("val" or "train"), in order, as the metadata lists them."""
    meta = read_meta(output_dir, prefix)
    if meta is None:
        raise UsageError(f"no {meta_path(output_dir, prefix)}: make the shards with fineweb.py")
    return [os.path.join(output_dir, s["file"]) for s in meta["shards"] if s["split"] == split]


def open_output(output_dir, prefix, source, shard_size, overwrite):
    """The metadata to continue from: a fresh one, or that of an interrupted run of the same source."""
    os.makedirs(output_dir, exist_ok=True)

    def mine(pattern):
        return glob.glob(os.path.join(glob.escape(output_dir), glob.escape(prefix) + pattern))
    shards = mine("_val_*.npy") + mine("_train_*.npy")
    meta = None if overwrite else read_meta(output_dir, prefix)
    if overwrite:
        for path in shards + mine("_meta.json"):
            os.remove(path)
    elif meta is None and shards:
        raise UsageError(f"{output_dir} holds {prefix} shards but no "
                         f"{os.path.basename(meta_path(output_dir, prefix))}; "
                         "pass --overwrite to replace them, or another --output_dir or --prefix")
    elif meta is not None and (meta.get("source") != source or meta.get("shard_size") != shard_size):
        other = "another source" if meta.get("source") != source else f"--shard_size {meta.get('shard_size')}"
        raise UsageError(f"{output_dir} holds {prefix} shards made from {other}; "
                         "pass --overwrite to replace them, or another --output_dir or --prefix")
    elif meta is not None:
        missing = [s["file"] for s in meta["shards"]
                   if not os.path.exists(os.path.join(output_dir, s["file"]))]
        if missing:
            raise UsageError(f"{os.path.join(output_dir, missing[0])} is missing; "
                             "pass --overwrite to start over")
    for tmp in mine("_*.tmp"):
        os.remove(tmp)  # half-written by a run that was killed
    if meta is not None:
        return meta
    # shards: {file, split, tokens, documents (that begin in it), next_document, next_token (where the
    # next shard begins: see cut_shards)}, in order; tokens, documents and empty_documents are totals
    return {"source": source, "tokenizer": "gpt2", "eot": EOT, "dtype": "uint16", "shard_size": shard_size,
            "shards": [], "tokens": 0, "documents": 0, "empty_documents": 0, "complete": False}


# -----------------------------------------------------------------------------
# --download: kjj0's FineWeb shards on the HF hub, GPT-2 tokens in llm.c's .bin format, 100M tokens a shard

DOWNLOADS = {  # NAME: (HF dataset, file prefix, train shards), from modded-nanogpt's data/cached_*.py
    "fineweb10B": ("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "finewebedu10B": ("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
    "fineweb100B": ("kjj0/fineweb100B-gpt2", "fineweb", 1030),
}


def check_bin(path):
    """The token count of llm.c shard `path`: its header checked (bin_shards.open_bin) and its size exact."""
    count = len(open_bin(path))
    extra = os.path.getsize(path) - HEADER_BYTES - 2 * count
    if extra:
        raise UsageError(f"shard {path} has {extra:,} bytes after the {count:,} tokens its header counts")
    return count


def fetch_shard(repo, name, output_dir):
    """Shard `name` of `repo` into output_dir, checked: copied from the HF cache where it is there (offline
    too), else downloaded by huggingface_hub straight into output_dir (resuming a dropped connection)."""
    from huggingface_hub import hf_hub_download, is_offline_mode, try_to_load_from_cache
    path = os.path.join(output_dir, name)
    cached = try_to_load_from_cache(repo, name, repo_type="dataset")
    if isinstance(cached, str):
        try:
            check_bin(cached)
        except UsageError as e:
            raise UsageError(f"{e}; that is the Hugging Face cache's copy: delete it and rerun to download it"
                             ) from None
        with open(cached, "rb") as src:
            write_atomically(path, lambda f: shutil.copyfileobj(src, f))
        return check_bin(path)
    try:
        hf_hub_download(repo, name, repo_type="dataset", local_dir=output_dir)
    except Exception as e:  # offline, unreachable, gated, not found: huggingface_hub raises many types
        if is_offline_mode():
            raise UsageError(f"{name} of {repo} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 is "
                             "set: unset it to download, or tokenize local text with --input") from None
        cause = e.__cause__ or e  # unreachable: the connection's error, under huggingface_hub's long one
        first_line = (str(cause).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"could not download {name} from {repo} ({type(cause).__name__}: {first_line}); "
                         "offline? rerun the same command when online: it keeps the shards it has") from None
    try:
        return check_bin(path)
    except UsageError as e:
        os.remove(path)  # so that a rerun downloads it again
        raise UsageError(f"{e}; downloaded from {repo}, now removed: rerun to download it again") from None


def download(args):
    if args.download not in DOWNLOADS:
        raise UsageError(f"--download takes {', '.join(DOWNLOADS)} (got '{args.download}')")
    if args.input or args.dataset or args.name or args.streaming:
        raise UsageError("--download fetches shards already tokenized: drop --input, --dataset, --name "
                         "and --streaming")
    repo, prefix, train_shards = DOWNLOADS[args.download]
    n = train_shards if args.shards is None else args.shards
    if not 1 <= n <= train_shards:
        raise UsageError(f"--shards must be 1 to {train_shards}, the train shards of {repo} (got {n})")
    output_dir = args.output_dir or args.download
    os.makedirs(output_dir, exist_ok=True)
    if glob.glob(os.path.join(glob.escape(output_dir), "*.npy")):
        raise UsageError(f"{output_dir} holds fineweb.py's .npy shards, and --data reads one kind per "
                         "folder: pass another --output_dir")
    # a run killed mid-shard leaves its part behind: our copy's .tmp, or huggingface_hub's, never read again
    folder = glob.escape(output_dir)
    for part in glob.glob(os.path.join(folder, "*.bin.tmp")) + glob.glob(
            os.path.join(folder, ".cache", "huggingface", "download", "**", "*.incomplete"), recursive=True):
        os.remove(part)
    names = [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, n + 1)]
    tokens = fetched = 0
    for name in tqdm(names, desc=f"{args.download} shards", unit="shard", disable=None):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            try:
                tokens += check_bin(path)
                continue
            except UsageError as e:  # e.g. cut short by a disk that filled, or a kill during a copy
                tqdm.write(f"{e}: replacing it")
                os.remove(path)
        tokens += fetch_shard(repo, name, output_dir)
        fetched += 1
    print(f"{output_dir}: {len(names)} shards (1 val, {n} train) of {repo}, {tokens:,} tokens; "
          f"{fetched} fetched, {len(names) - fetched} already there; train on them with --data {output_dir}")


# -----------------------------------------------------------------------------
# the script


def available_memory():
    try:
        with open("/proc/meminfo") as f:  # Linux: MemAvailable counts the page cache that can be freed
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None  # unknown (e.g. macOS, Windows): trust the user


def run(args):
    if args.shard_size < 1:
        raise UsageError(f"--shard_size must be >= 1 token (got {args.shard_size}); the default is 100000000")
    memory = available_memory()
    if memory is not None and 2 * args.shard_size > memory:
        raise UsageError(f"--shard_size {args.shard_size:,} needs {2 * args.shard_size / 2**30:.1f} GiB "
                         f"of memory, only {memory / 2**30:.1f} GiB is available; "
                         "pass a smaller --shard_size")
    if args.shards is not None:
        raise UsageError("--shards goes with --download; the tokenized shards' size is --shard_size")
    if args.num_proc < 1:
        raise UsageError(f"--num_proc must be >= 1 (got {args.num_proc})")
    if args.input and args.dataset:
        raise UsageError("pass either --input (local files) or --dataset (Hugging Face), not both")
    if not args.input:
        args.name = args.name or (DEFAULT_NAME if args.dataset is None else None)
        args.dataset = args.dataset or DEFAULT_DATASET
    paths = expand_inputs(args.input) if args.input else None
    args.output_dir = args.output_dir or "edu_fineweb10B"
    meta = open_output(args.output_dir, args.prefix, source_of(args, paths), args.shard_size, args.overwrite)
    if meta["complete"]:
        print(f"{args.output_dir} is already complete: {len(meta['shards'])} shards, "
              f"{meta['tokens']:,} tokens")
        return meta

    # continue where the last complete shard ended (nowhere, for a fresh run)
    last = meta["shards"][-1] if meta["shards"] else {"next_document": 0, "next_token": 0}
    document, token = last["next_document"], last["next_token"]
    if meta["shards"]:
        print(f"resuming after {len(meta['shards'])} complete shards ({meta['tokens']:,} tokens)")
    if paths:
        docs = local_documents(paths, args.text_field, skip=document)
    else:
        docs = hf_documents(args.dataset, args.name, args.split, args.text_field, args.streaming,
                            skip=document)

    t0, tokens_before = time.time(), meta["tokens"]
    progress = tqdm(unit="tok", unit_scale=True, initial=meta["tokens"],
                    disable=None)  # disable=None: only on a terminal

    def counted(results):
        for tokens, lengths in results:
            progress.update(len(tokens))
            yield tokens, lengths
    with progress:
        for tokens, docs_in_shard, next_document, next_token, is_last in cut_shards(
                counted(tokenized(docs, args.num_proc)), args.shard_size, document, token):
            index = len(meta["shards"])
            if index == 0 and is_last:
                raise UsageError(f"the input has only {len(tokens):,} tokens: not enough for a val shard "
                                 f"and a train shard of --shard_size {args.shard_size:,}; "
                                 f"pass a smaller --shard_size, e.g. {max(1, len(tokens) // 10):,}")
            if index == 0:
                save_meta(args.output_dir, args.prefix, meta)  # claim the folder for this source before any
                                                               # shard
            name = shard_name(args.prefix, index)
            write_atomically(os.path.join(args.output_dir, name), lambda f: np.save(f, tokens))
            meta["shards"].append({"file": name, "split": "val" if index == 0 else "train",
                                   "tokens": len(tokens), "documents": docs_in_shard,
                                   "next_document": next_document, "next_token": next_token})
            meta["tokens"] += len(tokens)
            meta["documents"] += docs_in_shard
            # documents before next_document are written or empty; one more has begun if next_token > 0
            meta["empty_documents"] = next_document + (next_token > 0) - meta["documents"]
            meta["complete"] = is_last
            save_meta(args.output_dir, args.prefix, meta)
            rate = (meta["tokens"] - tokens_before) / (time.time() - t0)
            progress.write(f"{os.path.join(args.output_dir, name)}: {len(tokens):,} tokens, "
                           f"{docs_in_shard:,} documents; {rate:,.0f} tokens/s")
    if not meta["complete"]:
        raise UsageError("the input has no text" if not meta["shards"] else
                         "the input ended before the shards already written; pass --overwrite to start over")
    dt = time.time() - t0
    n = len(meta["shards"])
    print(f"{args.output_dir}: {n} shards (1 val, {n - 1} train), {meta['tokens']:,} tokens, "
          f"{meta['documents']:,} documents, {meta['empty_documents']:,} empty documents skipped; "
          f"{(meta['tokens'] - tokens_before) / dt:,.0f} tokens/s")
    return meta


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+",
                   help="local .txt/.jsonl/.parquet files or globs, instead of a HF dataset")
    p.add_argument("--dataset", help=f"Hugging Face dataset (default {DEFAULT_DATASET})")
    p.add_argument("--name",
                   help=f"dataset config (default {DEFAULT_NAME} for the default dataset, none otherwise)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--text_field", default="text",
                   help="the field (jsonl) or column (parquet, HF) holding the text (default text)")
    p.add_argument("--streaming", action="store_true",
                   help="stream the HF dataset instead of downloading it first")
    p.add_argument("--output_dir",
                   help="where the shards go (default edu_fineweb10B, or NAME with --download)")
    p.add_argument("--prefix", default="edufineweb",
                   help="shard file names start with it (default edufineweb)")
    p.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard (default 100000000)")
    p.add_argument("--num_proc", type=int,
                   default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards made from another source or shard size")
    p.add_argument("--download", metavar="NAME",
                   help=f"fetch kjj0's tokenized shards instead: {', '.join(DOWNLOADS)}")
    p.add_argument("--shards", type=int,
                   help="with --download: the val shard and this many train shards (default all)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        download(args) if args.download else run(args)
    except UsageError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue after the last complete shard",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
