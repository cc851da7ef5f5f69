"""
The train loader's data order, against a plain reference written from its documented semantics. The reference
was checked against the loader before its sequences were vectorized, so these tests pin the order that runs
made before then resume onto: any change to it breaks them.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_train import make_shards
from train_gpt2 import EOT, DataLoader

T = 16
# uneven shards: an empty one, one- and two-document ones (a sequence or two, or none), so that a micro-batch
# can span three shards; the first (make_shards' val shard) is left out
DOCS_PER_SHARD = [5, 30, 0, 45, 1, 2, 25, 12]
# (accum, world, B): one GPU with accumulation, 8 ranks, and splits in between
SPLITS = [(1, 1, 4), (8, 1, 2), (1, 8, 1), (2, 2, 5), (3, 4, 3)]


class Reference:
    """Epoch e reads the shards in the order default_rng([seed, e]).permutation, each shard's documents
    (each from one EOT to the next; a shard may open with a document's tail) in the order
    default_rng([seed, e, shard]), and cuts each shard on its own into the T+1-token windows at stride T
    that fit. Without shuffle: the shards and their documents as stored, every epoch. Sequence q is the
    (q mod the epoch's count)-th of epoch q // count."""

    def __init__(self, shards, seed, shuffle):
        self.shards = [s if isinstance(s, np.ndarray) else np.load(s) for s in shards]
        self.seed, self.shuffle, self.epochs = seed, shuffle, {}

    def epoch(self, e):
        if e not in self.epochs:
            n = len(self.shards)
            order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else range(n)
            seqs = []
            for s in order:
                tokens = self.shards[s]
                if self.shuffle:
                    docs = np.split(tokens, np.flatnonzero(tokens == EOT))
                    docs = docs[1:] if len(tokens) and tokens[0] == EOT else docs  # no empty piece before EOT
                    order_docs = np.random.default_rng([self.seed, e, s]).permutation(len(docs))
                    tokens = np.concatenate([docs[i] for i in order_docs])
                seqs += [tokens[j * T:j * T + T + 1] for j in range((len(tokens) - 1) // T)]
            self.epochs[e] = seqs
        return self.epochs[e]

    def sequence(self, q):
        e, r = divmod(q, len(self.epoch(0)))
        return self.epoch(e)[r]

    def step_batches(self, step, accum, rank, world, B):
        q0 = lambda micro: ((step * accum + micro) * world + rank) * B
        seqs = np.array([[self.sequence(q0(m) + b) for b in range(B)] for m in range(accum)], dtype=np.int64)
        return torch.from_numpy(seqs[..., :-1]), torch.from_numpy(seqs[..., 1:])


def shards_of(tmp_path, kind):
    make_shards(tmp_path, DOCS_PER_SHARD)
    paths = sorted(str(p) for p in tmp_path.glob("*_train_*.npy"))
    return paths if kind == "npy" else [np.load(p) for p in paths]  # in memory: a tokenized .txt file


@pytest.mark.parametrize("kind", ["npy", "in memory"])
@pytest.mark.parametrize("shuffle, seed", [(True, 1337), (True, 3), (False, 1337)])
def test_step_batches_are_the_documented_order_for_any_split_across_shard_and_epoch_boundaries(
        tmp_path, kind, shuffle, seed):
    shards = shards_of(tmp_path, kind)
    loader, ref = DataLoader(shards, T, 50304, seed, shuffle), Reference(shards, seed, shuffle)
    n = loader.seqs_per_epoch
    assert n == len(ref.epoch(0)) and 0 in loader.seqs_per_shard and 1 in loader.seqs_per_shard
    shard_of = []  # each sequence's (epoch, shard), to show which boundaries the batches span
    for e in range(3):
        order = np.random.default_rng([seed, e]).permutation(len(shards)) if shuffle else range(len(shards))
        shard_of += [(e, s) for s in order for _ in range(loader.seqs_per_shard[s])]
    spans = set()
    for accum, world, B in SPLITS:
        for step in range(int(2.5 * n) // (accum * world * B)):  # into the third epoch
            for rank in range(world):
                x, y = loader.step_batches(step, accum, rank, world, B)
                want_x, want_y = ref.step_batches(step, accum, rank, world, B)
                assert x.shape == y.shape == (accum, B, T) and x.dtype == y.dtype == torch.long
                assert torch.equal(x, want_x) and torch.equal(y, want_y), (accum, world, B, step, rank)
                for m in range(accum):
                    q = ((step * accum + m) * world + rank) * B
                    spans.add((len({shard_of[q + b] for b in range(B)}), q // n != (q + B - 1) // n))
    assert {(2, False), (3, False), (2, True)} <= spans  # shard boundaries, three shards, an epoch boundary


@pytest.mark.parametrize("shuffle", [True, False])
def test_batch_and_sequence_are_the_documented_order_for_any_indices(tmp_path, shuffle):
    shards = shards_of(tmp_path, "npy")
    loader, ref = DataLoader(shards, T, 50304, 7, shuffle), Reference(shards, 7, shuffle)
    n = loader.seqs_per_epoch
    # evaluate_val's strided lists; lists across epochs, backwards, with repeats
    for indices in [list(range(1, n, 3)), list(range(n - 4, n + 5)), [3 * n + 2, 5, 2 * n - 1, 5, 0], [n]]:
        x, y = loader.batch(indices)
        want = torch.from_numpy(np.array([ref.sequence(q) for q in indices], dtype=np.int64))
        assert torch.equal(x, want[:, :-1]) and torch.equal(y, want[:, 1:])
        assert all(np.array_equal(loader.sequence(q), ref.sequence(q)) for q in indices)
    x, y = loader.batch([])  # a rank with no val batch left
    assert x.shape == y.shape == (0, T) and x.dtype == torch.long


def test_a_step_is_the_same_whatever_the_loader_read_before(tmp_path):
    # resuming asks a fresh loader for a late step first; a prefetch may run ahead into the next epoch
    shards = shards_of(tmp_path, "npy")
    fresh = lambda: DataLoader(shards, T, 50304, 5)
    per_epoch = fresh().seqs_per_epoch // 8  # steps of 8 sequences (accum 2, world 2, B 2) in an epoch, or so
    steps = [3 * per_epoch + 1, 0, per_epoch, per_epoch - 1, 2 * per_epoch + 3, 1, 3 * per_epoch + 1]
    walked = fresh()
    for step in steps:
        for rank in range(2):
            got = walked.step_batches(step, 2, rank, 2, 2)
            want = fresh().step_batches(step, 2, rank, 2, 2)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (step, rank)


def test_bench_loader_runs_and_its_old_loop_cuts_the_same_batches():
    # bench/bench_loader.py times the loader against the sequence-at-a-time loop it replaced, and asserts that both
    # cut the same batches: a small run keeps it working
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_loader.py"), "--shards", "5", "--shard_tokens",
                        "200000", "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "64 sequences (accum 1, world 8, B 64): before " in r.stdout and "512 sequences" in r.stdout


def test_a_text_file_is_tiktokens_tokens_held_as_numpy_not_a_python_list(tmp_path):
    # --data big.txt: encode_ordinary's list costs ~56 bytes a token on every rank; numpy holds 2 (uint16)
    import tracemalloc
    from train_gpt2 import find_data, get_tokenizer
    text = (ROOT / "input.txt").read_text() + "\n<|endoftext|> is text here, not a document boundary\n"
    (tmp_path / "big.txt").write_text(text)
    get_tokenizer().encode_to_numpy("its ranks loaded before", disallowed_special=())
    tracemalloc.start()
    try:
        train, val = find_data(str(tmp_path / "big.txt"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tokens = np.concatenate([train[0], val[0]])
    assert tokens.dtype == np.uint16 and tokens.tolist() == get_tokenizer().encode_ordinary(text)  # the oracle
    assert peak < 4 * len(text) + 8 * len(tokens), (peak, len(text), len(tokens))  # the text, and no list
