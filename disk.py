"""
The disk a run writes to: files written whole or not at all, even across a host crash (fsync'd, then renamed),
and room for a checkpoint checked before the work it is to keep. train_gpt2.py's checkpoints and fineweb.py's
shards are written here, and checkpoints read back.
"""
import contextlib
import os
import shutil

import torch

from errors import CorruptCheckpoint, UsageError
from run_checks import find_checkpoint


def write_atomically(path, write):
    """write(f) into path's .tmp, then renamed over path: a reader, a rerun after a kill, or a resume after a
    power loss finds the old file or the whole new one, never half of one. A failed write (a full disk)
    removes the .tmp and leaves the old file as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if os.name == "posix":  # and the rename itself: without it a crash can bring back the old name's file
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_checkpoint(path, ckpt, size):
    """torch.save(ckpt) to path, fsync'd and renamed: a kill or a host crash mid-write leaves the previous
    checkpoint the newest. A write that fails (a disk filled since step 0) is one line; `size`: what it
    needs."""
    folder = os.path.dirname(path) or "."
    try:
        write_atomically(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:  # a full disk is torch.save's RuntimeError "enforce fail at ..."
        previous = find_checkpoint(folder) or "no earlier checkpoint"
        raise UsageError(f"could not write {path} ({str(e).splitlines()[0][:100]}): '{folder}' has "
                         f"{pretty_bytes(free_bytes(folder))} free and a checkpoint needs "
                         f"{pretty_bytes(size)}; {previous} is intact: free some space there and --resume"
                         ) from None


def free_bytes(folder):
    """The bytes free to this user on folder's filesystem (a folder not made yet: its nearest parent's)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def pretty_bytes(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_checkpoint_room(cfg, size, start_step):
    """Before step 0: stop when --log_dir's disk has no room for one checkpoint of `size` bytes, and say so
    when it has none for all that the run writes from start_step on (it keeps every one)."""
    free = free_bytes(cfg.log_dir)
    if free < size:
        raise UsageError(f"'{cfg.log_dir}' has {pretty_bytes(free)} free and a checkpoint needs "
                         f"{pretty_bytes(size)}: free some space there, or pass a --log_dir on a disk with "
                         "room")
    every = cfg.checkpoint_interval
    count = cfg.max_steps // every - start_step // every + (cfg.max_steps % every > 0)  # and the last step's
    if free < count * size:
        print(f"note: '{cfg.log_dir}' has room for {free // size} of the {count} checkpoints this run writes "
              f"({pretty_bytes(size)} each, {pretty_bytes(free)} free): delete old ones as it goes, or raise "
              "--checkpoint_interval", flush=True)


def load_checkpoint(path):
    # memory-mapped: a machine's ranks share one copy in the page cache, and no GPU holds the state twice
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint '{path}' does not exist") from None
    except Exception as e:
        if isinstance(e, MemoryError) or "allocate memory" in str(e):  # the CPU allocator's words for it
            size = os.path.getsize(path) / 2**30
            raise UsageError(f"checkpoint '{path}' ({size:.1f} GiB) does not fit in this machine's free "
                             "memory: free some, or load it where there is more") from None
        raise CorruptCheckpoint(f"checkpoint '{path}' is corrupt or not a train_gpt2.py checkpoint "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); pass another"
                                ) from None


def by_name(optimizer_state, raw_model, optimizer):
    """The optimizer state keyed by parameter name, as DCP's loader wants it, from index keys (torch.optim's
    own, and older FSDP checkpoints') or names: matched by order, as load_state_dict matches them."""
    names = {p: n for n, p in raw_model.named_parameters()}
    name = dict(zip([k for group in optimizer_state["param_groups"] for k in group["params"]],
                    [names[p] for group in optimizer.param_groups for p in group["params"]]))
    return {"state": {name[k]: s for k, s in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [name[k] for k in group["params"]]}
                             for group in optimizer_state["param_groups"]]}
