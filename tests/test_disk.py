"""
The disk under a run: checkpoints written so that a host crash leaves the previous one loadable, --resume going on
from the newest one that loads, and a disk with no room for a checkpoint found before step 0 (or, filled later,
named in one line with the previous checkpoint intact). Real small disks are tmpfs mounts, where this machine
lets the tests mount one.
"""
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

import disk
import train_gpt2
from conftest import ROOT, launch, run_main
from memory_plan import checkpoint_bytes
from run_checks import find_run
from test_train import TINY, assert_same_weights, expect_error, main_1_thread
from train_gpt2 import parse_args

MiB = 2**20
ARGS = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "10", "--checkpoint_interval", "4",
               "--eval_interval", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """ARGS run to the end, never interrupted: checkpoints at steps 4, 8 and 10."""
    log = tmp_path_factory.mktemp("full") / "run"
    main_1_thread(ARGS + ["--log_dir", str(log)])
    return log


def small_disk(folder, mib):
    """folder as a tmpfs of `mib` MiB; a skip where this machine does not let the tests mount one."""
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
    return folder


@pytest.fixture
def mounts():
    """small_disk(folder, mib), unmounted after the test."""
    made = []

    def mount(folder, mib):
        made.append(small_disk(folder, mib))
        return made[-1]
    yield mount
    for folder in made:
        subprocess.run(["umount", "--lazy", str(folder)])  # lazy: a process still closing a file cannot fail it


def test_a_checkpoint_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    path = tmp_path / "model_000001.pt"
    disk.write_atomically(str(path), lambda f: torch.save({"w": torch.ones(3)}, f))
    assert events == [("fsync", str(path) + ".tmp"), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert torch.equal(torch.load(path)["w"], torch.ones(3))


def test_resume_skips_a_checkpoint_cut_short_by_a_crash_and_ends_as_the_uninterrupted_run(
        tmp_path, uninterrupted, capsys):
    # a host crash just after model_000008.pt was renamed: the file is there, cut to a third of its size
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(uninterrupted / "model_000004.pt", run)
    whole = (uninterrupted / "model_000008.pt").read_bytes()
    (run / "model_000008.pt").write_bytes(whole[:len(whole) // 3])
    (run / "log.txt").write_text("".join(line for line in open(uninterrupted / "log.txt")
                                         if int(line.split()[0]) <= 8))
    cfg = parse_args(ARGS + ["--log_dir", str(run), "--resume"])[1]
    assert find_run(cfg, train_gpt2.load_checkpoint) == str(run / "model_000004.pt")
    skipped = f"--resume: skipping {run / 'model_000008.pt'}, which does not load (checkpoint "
    assert skipped in capsys.readouterr().out
    assert (run / "model_000008.pt").stat().st_size == len(whole) // 3  # kept, not deleted
    main_1_thread(ARGS + ["--log_dir", str(run), "--resume"])
    out = capsys.readouterr().out
    assert out.count(skipped) == 1 and "resuming at step 4" in out
    assert (run / "log.txt").read_text() == (uninterrupted / "log.txt").read_text()
    for ckpt in ("model_000008.pt", "model_000010.pt"):  # model_000008.pt written anew as the run passed it
        assert_same_weights(uninterrupted / ckpt, run / ckpt)


def test_resume_where_no_checkpoint_loads_stops_and_leaves_the_run_as_it_was(tmp_path, uninterrupted):
    # every checkpoint cut short: starting over would rewrite log.txt, the run's whole history
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model_000004.pt", "model_000008.pt"):
        whole = (uninterrupted / name).read_bytes()
        (run / name).write_bytes(whole[:len(whole) // 3])
    shutil.copy(uninterrupted / "log.txt", run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    msg = expect_error(ARGS + ["--log_dir", str(run), "--resume"], "none of the 2 checkpoint(s)")
    assert "model_000008.pt, model_000004.pt" in msg and "move them away" in msg
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # byte for byte


def test_a_checkpoints_size_is_known_before_it_is_written(uninterrupted):
    model_cfg, cfg, _, _ = parse_args(ARGS)
    size = (uninterrupted / "model_000010.pt").stat().st_size
    assert checkpoint_bytes(model_cfg, cfg) <= size <= checkpoint_bytes(model_cfg, cfg) + 100_000


def test_no_room_for_a_checkpoint_stops_before_step_0(tmp_path, monkeypatch, capsys):
    model_cfg, cfg, _, _ = parse_args(ARGS)
    need = checkpoint_bytes(model_cfg, cfg)
    free = {"now": need - 1}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free["now"]))
    r = run_main(train_gpt2.main, ARGS + ["--log_dir", tmp_path / "run"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"'{tmp_path / 'run'}' has {disk.pretty_bytes(need - 1)} free and a checkpoint needs " \
           f"{disk.pretty_bytes(need)}: free some space there" in r.stderr
    assert "step" not in r.stdout and not (tmp_path / "run").exists()
    # room for one but not for the 3 this run writes: it runs, and says so first
    free["now"] = 2 * need
    r = run_main(train_gpt2.main, ARGS + ["--log_dir", tmp_path / "run"])
    assert r.returncode == 0, r.stderr
    assert "note: " in r.stdout and "has room for 2 of the 3 checkpoints this run writes" in r.stdout
    assert r.stdout.index("note: ") < r.stdout.index("step     0")


def test_a_small_disk_is_found_before_step_0(tmp_path, mounts):
    log = mounts(tmp_path / "disk", 8)  # a checkpoint of this model is 18.7 MiB
    r = run_main(train_gpt2.main, ARGS + ["--log_dir", log / "run"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"'{log / 'run'}' has 8.0 MiB free and a checkpoint needs 18.7 MiB" in r.stderr
    assert "step" not in r.stdout and os.listdir(log) == []


# train_gpt2.main under launch, with the disk of --log_dir filled by a file of FILL_MIB MiB right after rank 0
# logs `STEP STREAM`
FILLER = """
import os, sys, logger, train_gpt2
where, fill_mib = sys.argv[1].split(",")
def log(self, step, stream, *args, _real=logger.Logger.log):
    _real(self, step, stream, *args)
    if self.enabled and f"{step} {stream}" == where:
        with open(os.path.join(os.path.dirname(self.path), "..", "filler"), "wb") as f:
            f.write(bytes(int(fill_mib) * 2**20))
logger.Logger.log = log
train_gpt2.main(sys.argv[2:])
"""


@pytest.mark.parametrize("ranks", [None, 2])
def test_a_disk_filled_during_the_run_stops_it_in_one_line_with_the_last_checkpoint_intact(
        tmp_path, mounts, uninterrupted, ranks):
    log = mounts(tmp_path / "disk", 64)  # room for three checkpoints of 18.7 MiB
    (tmp_path / "filler.py").write_text(FILLER)
    args = ARGS + ["--log_dir", log / "run"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # as the uninterrupted run's
    r = launch(["5 train,40"] + args, cwd=tmp_path, ranks=ranks, script=tmp_path / "filler.py", env=one_thread)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-3000:]  # rank 0's line; no rank's traceback
    assert r.stderr.startswith(f"error: could not write {log / 'run' / 'model_000008.pt'} (")
    assert f"'{log / 'run'}' has " in r.stderr and "a checkpoint needs 18.7 MiB" in r.stderr
    assert f"{log / 'run' / 'model_000004.pt'} is intact: free some space there and --resume" in r.stderr
    assert sorted(os.listdir(log / "run")) == ["log.txt", "model_000004.pt"]  # no .tmp left to fill the disk
    os.remove(log / "filler")
    r = launch(args + ["--resume"], cwd=tmp_path, ranks=ranks, env=one_thread)
    assert r.returncode == 0 and "resuming at step 4" in r.stdout, r.stderr
    if ranks is None:  # the same run as the uninterrupted one, which ran in one process too
        assert_same_weights(uninterrupted / "model_000010.pt", log / "run" / "model_000010.pt")
