"""
Under torchrun every rank takes the same branch wherever a branch changes which collectives run, and DDP's
compiled step is the graph dynamo split at DDP's buckets. Two gloo ranks on the CPU; a rank's own view of its
disk is changed by a wrapper script that patches what that rank alone reads.
"""

import pytest

from conftest import ROOT, launch
from test_train import TINY, read_log

FIXTURE = ROOT / "tests" / "fixtures" / "hellaswag_val_100.jsonl"
ARGS = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "2", "--eval_interval", "1",
               "--hellaswag", "--hellaswag_data", str(FIXTURE)]
# rank 1 alone fails to read what $LOST names, as a node without that file on its local disk would
RANK_1_LOSES = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import hellaswag, train_gpt2
def lost(*args, **kwargs):
    raise train_gpt2.UsageError("no such file on rank 1's disk")
if os.environ["RANK"] == "1" and "LOST" in os.environ:
    module, name = os.environ["LOST"].split(".")
    setattr({{"hellaswag": hellaswag, "train_gpt2": train_gpt2}}[module], name, lost)
train_gpt2.main()
"""


def two_ranks(tmp_path, args, env=None):
    script = tmp_path / "rank_1_loses.py"
    script.write_text(RANK_1_LOSES)
    # a rank left waiting on a collective the other never reaches would hang: the timeout fails the test
    return launch(args, cwd=tmp_path, ranks=2, script=script, env=env)


@pytest.fixture(scope="module")
def compiled_ddp(tmp_path_factory):
    """One compiled 2-rank DDP run, read by two tests: rank 1 cannot read HellaSwag, and dynamo logs its graphs."""
    tmp = tmp_path_factory.mktemp("compiled_ddp")
    r = two_ranks(tmp, ARGS + ["--log_dir", "run", "--compile"],
                 env={"LOST": "hellaswag.load_examples", "TORCH_LOGS": "ddp_graphs"})
    return tmp, r


def assert_hellaswag_skipped(r, log):
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("HellaSwag skipped: rank 1: no such file on rank 1's disk") == 1, r.stdout
    assert sorted(read_log(log, "train")) == [0, 1] and sorted(read_log(log, "val")) == [0, 1]
    assert not read_log(log, "hella")


@pytest.mark.slow
def test_hellaswag_missing_on_one_rank_is_skipped_by_every_rank_under_ddp(compiled_ddp):
    tmp, r = compiled_ddp
    assert_hellaswag_skipped(r, tmp / "run" / "log.txt")


@pytest.mark.slow
def test_hellaswag_missing_on_one_rank_is_skipped_by_every_rank_under_fsdp(tmp_path):
    r = two_ranks(tmp_path, ARGS + ["--log_dir", "run", "--fsdp"], env={"LOST": "hellaswag.load_examples"})
    assert_hellaswag_skipped(r, tmp_path / "run" / "log.txt")


@pytest.mark.slow
def test_data_missing_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    r = two_ranks(tmp_path, ARGS + ["--log_dir", "run"], env={"LOST": "train_gpt2.find_data"})
    assert r.returncode != 0
    # every rank stops; rank 0 alone says why
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert errors == ["error: rank 1: no such file on rank 1's disk"], r.stderr
    assert not (tmp_path / "run").exists()


def assert_split_once_per_rank(r):
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        logged = [line for line in r.stderr.splitlines() if line.startswith(f"[rank{rank}]:")]
        assert sum("---split graph---" in line for line in logged) == 1, r.stderr[-3000:]
        assert any("---submod_1 graph---" in line for line in logged)  # at least two pieces


# dynamo's DDPOptimizer splits a graph at DDP's bucket boundaries, so that each bucket's all-reduce overlaps the
# rest of the backward, only when it compiles the graph inside DDP's forward; step 0's val comes first
@pytest.mark.slow
def test_ddps_compiled_step_is_split_at_its_buckets_though_val_runs_first(compiled_ddp):
    assert_split_once_per_rank(compiled_ddp[1])


@pytest.mark.slow
def test_ddps_compiled_step_with_recompute_is_split_at_its_buckets_too(tmp_path):
    r = two_ranks(tmp_path, ARGS + ["--log_dir", "run", "--compile", "--no-hellaswag", "--recompute"],
                 env={"TORCH_LOGS": "ddp_graphs"})
    assert_split_once_per_rank(r)
    assert sorted(read_log(tmp_path / "run" / "log.txt", "train")) == [0, 1]
