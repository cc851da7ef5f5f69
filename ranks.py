"""
What the ranks of a torchrun group agree on: each attempt's own store, and every branch that changes which
collectives run, decided on rank 0 or by all ranks together, so that no rank waits on a collective the
others skip.
"""
import os
import sys

import torch.distributed as dist

from errors import UsageError


def attempt_store(timeout):
    """torchrun's TCPStore under a prefix naming this attempt: torchrun 2.5+ keeps one store across restarts,
    and a restarted rank would read the dead attempt's peer addresses (pytorch#135712). Each node counts its
    own restarts."""
    if int(os.environ["GROUP_WORLD_SIZE"]) > 1 and int(os.environ["TORCHELASTIC_MAX_RESTARTS"]) > 0:
        raise UsageError("torchrun --max-restarts over several nodes shares one TCPStore between attempts, "
                         "which a restarted group misreads: "
                         "launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    return dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def on_every_rank(fn, distributed):
    """fn() on every rank; if any rank raised a UsageError, every rank raises the first one: a branch that
    changes which collectives run (data found, HellaSwag loaded or skipped) is then taken by all ranks or
    by none."""
    try:
        result, error = fn(), None
    except UsageError as e:
        result, error = None, str(e)
    if distributed and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)
    if error:
        raise UsageError(error, every_rank=True)
    return result


def on_rank_0(fn, distributed):
    """fn() on rank 0, its result (or UsageError) broadcast: what rank 0 sees on its disk is what every rank
    does."""
    box = [None, None]
    if not distributed or dist.get_rank() == 0:
        try:
            box[0] = fn()
        except UsageError as e:
            box[1] = str(e)
    if distributed:
        dist.broadcast_object_list(box, src=0)
    if box[1]:
        raise UsageError(box[1], every_rank=True)
    return box[0]


def exit_if_a_rank_died(e, rank, dist_timeout):
    """Exit 1 with one line if e says another rank died or hung (NCCL: a DistError; gloo: a RuntimeError
    naming its source), so that torchrun --max-restarts restarts the group; else return."""
    if not (isinstance(e, dist.DistError) or "/gloo/" in str(e)):
        return
    print(f"error: rank {rank}: another rank died or did not answer within --dist_timeout {dist_timeout} s "
          f"({str(e).splitlines()[0]}); with torchrun --max-restarts and --resume the run goes on from its "
          "last checkpoint", file=sys.stderr, flush=True)
    # exit now: freeing DDP's Reducer joins gloo's worker thread, which can wait on our GIL: a deadlock
    sys.stdout.flush()
    os._exit(1)
