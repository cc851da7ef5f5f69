"""
--data reads llm.c's .bin shards (a 256-int32 header: magic 20240520, version 1, the count; then uint16 tokens) as
it reads fineweb.py's .npy shards: the same tokens give the same batches, the same run and the same val loss. The
header is written here from llm.c's layout (dev/data/data_common.py), not with bin_shards.header.
"""
import json
import struct

import numpy as np
import pytest

from conftest import run_main
from test_train import TINY, expect_error, main_1_thread, make_shards
from train_gpt2 import DataLoader, find_data, main


def write_llmc(path, tokens, magic=20240520, version=1, count=None, dtype=np.uint16):
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", magic, version, len(tokens) if count is None else count, *[0] * 253))
        f.write(np.asarray(tokens, dtype=dtype).tobytes())


@pytest.fixture
def folders(tmp_path):
    """The same shards as .npy (fineweb.py's) and as .bin (llm.c's), named as each writes them."""
    npy = make_shards(tmp_path / "npy", [40, 120, 90, 150])
    (tmp_path / "bin").mkdir()
    for path in sorted(npy.glob("*.npy")):
        write_llmc(tmp_path / "bin" / path.name.replace("test_", "fineweb_").replace(".npy", ".bin"), np.load(path))
    return npy, tmp_path / "bin"


def test_bin_shards_give_the_npy_shards_batches(folders):
    (npy_train, npy_val), (bin_train, bin_val) = (find_data(str(f)) for f in folders)
    assert [p.rsplit("_", 1)[1] for p in bin_train] == ["000001.bin", "000002.bin", "000003.bin"]
    for shuffle in (True, False):
        a, b = (DataLoader(shards, 16, 50304, shuffle=shuffle) for shards in (npy_train, bin_train))
        for step in range(12):  # past the first epoch's end
            for x, y in zip(a.step_batches(step, 2, 1, 2, 3), b.step_batches(step, 2, 1, 2, 3)):
                assert x.equal(y)
    a, b = (DataLoader(shards, 16, 50304, shuffle=False) for shards in (npy_val, bin_val))
    assert all(a.batch(range(i, i + 4))[0].equal(b.batch(range(i, i + 4))[0]) for i in range(0, 8, 4))


def test_a_run_and_eval_only_on_bin_shards_equal_those_on_npy_shards(folders, tmp_path, capsys):
    args = TINY + ["--max_steps", "4", "--eval_interval", "2"]
    for folder in folders:
        main_1_thread(args + ["--data", str(folder), "--log_dir", str(tmp_path / f"run_{folder.name}")])
    assert (tmp_path / "run_npy" / "log.txt").read_text() == (tmp_path / "run_bin" / "log.txt").read_text()
    capsys.readouterr()
    ckpt = tmp_path / "run_npy" / "model_000004.pt"
    losses = [json.loads(run_main(main, TINY + ["--eval_only", "--init_from", ckpt, "--data", folder])
                         .stdout.splitlines()[-1])["val_loss"] for folder in folders]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("write, match", [
    (dict(magic=20240801, version=7, dtype=np.uint32), "llama-3 tokens (magic 20240801, uint32), not GPT-2's"),
    (dict(magic=123), "not an llm.c GPT-2 token shard (magic 123"),
    (dict(version=2), "llm.c's format version 2; this reads version 1"),
    (dict(count=10_000), "holds 1,000 tokens and its header says 10,000: cut short?"),
], ids=["llama-3", "magic", "version", "cut short"])
def test_a_bad_bin_shard_is_one_line_naming_it(folders, write, match):
    shard = folders[1] / "fineweb_train_000002.bin"
    write_llmc(shard, np.arange(1000) % 50000, **write)
    msg = expect_error(TINY + ["--data", str(folders[1]), "--log_dir", str(shard.parent / "run")], match)
    assert str(shard) in msg


def test_a_folder_of_both_kinds_is_refused(folders):
    npy, bin_ = folders
    (npy / "fineweb_train_000009.bin").write_bytes((bin_ / "fineweb_train_000001.bin").read_bytes())
    expect_error(TINY + ["--data", str(npy), "--log_dir", str(npy / "run")], "holds both .npy and .bin shards")
