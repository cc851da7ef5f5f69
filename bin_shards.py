"""
llm.c's token shards, the .bin files that llm.c and modded-nanogpt train on and kjj0's FineWeb datasets on
the HF hub ship: a header of 256 int32 (magic 20240520, version 1, the token count), then the GPT-2 tokens as
uint16 (llm.c's dev/data/data_common.py, write_datafile). --data reads a folder of them as it reads
fineweb.py's .npy shards: memory-mapped, in the same data order, with the same checks.
"""
import os

import numpy as np

from errors import UsageError

MAGIC, VERSION = 20240520, 1
HEADER_BYTES = 256 * 4
LLAMA3_MAGIC = 20240801  # llm.c's llama-3 shards: uint32 tokens of another tokenizer


def open_bin(path):
    """The shard's tokens, memory-mapped once its header is checked; a bad header is one line naming the
    file."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise UsageError(f"shard {path} is {size} bytes, shorter than llm.c's {HEADER_BYTES}-byte header: "
                         "cut short? fetch it again")
    magic, version, count = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic == LLAMA3_MAGIC:
        raise UsageError(f"shard {path} holds llm.c's llama-3 tokens (magic {magic}, uint32), not GPT-2's: "
                         f"use GPT-2 shards (magic {MAGIC})")
    if magic != MAGIC:
        raise UsageError(f"shard {path} is not an llm.c GPT-2 token shard (magic {magic}, not {MAGIC})")
    if version != VERSION:
        raise UsageError(f"shard {path} is llm.c's format version {version}; this reads version {VERSION}")
    if size < HEADER_BYTES + 2 * count:
        raise UsageError(f"shard {path} holds {(size - HEADER_BYTES) // 2:,} tokens and its header says "
                         f"{count:,}: cut short? fetch it again")
    if count == 0:
        return np.empty(0, dtype=np.uint16)  # np.memmap refuses a length of 0
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
