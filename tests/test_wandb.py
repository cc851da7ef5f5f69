"""
--wandb PROJECT against the oracle of log.txt: a run under WANDB_MODE=offline writes its W&B records to
log_dir/wandb/offline-run-*/run-ID.wandb, read back here record by record, as `wandb sync` would upload them.
"""
import glob
import json
import shutil
import struct
import sys
import time

import pytest

from conftest import ROOT, launch
from test_train import TINY, expect_error, read_log
from train_gpt2 import main

wandb_proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # never the network: offline mode, no error reports, no prompts
    for k, v in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_ERROR_REPORTING", "false"),
                 ("WANDB_DISABLE_CODE", "true"), ("WANDB_DISABLE_GIT", "true")):
        monkeypatch.setenv(k, v)


def records(path):
    """The protobuf Records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's log
    format (32 KiB blocks of chunks, each a CRC, a length, a type: 1 whole record, 2-4 its first/middle/last part)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, part = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_proto.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def offline_run(log_dir):
    """(run id, config, {step: {key: value}}, file) of the one offline run in log_dir."""
    [path] = glob.glob(str(log_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    # run.finish() can return before W&B's writer process has written the last records (seen on the loaded
    # 2-core VM): the file is whole once its exit record is in
    for _ in range(300):
        if [r.WhichOneof("record_type") for r in records(path)][-1:] == ["exit"]:
            break
        time.sleep(0.1)
    run_id, config, history = None, {}, {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config = {item.key: json.loads(item.value_json) for item in r.run.config.update}
        elif kind == "history":
            # a table's fields come as nested keys: samples/path, samples/nrows, ...
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(row.pop("_step"), {}).update(row)
    return run_id, config, history, path


def stream(history, key):
    return {step: row[key] for step, row in history.items() if key in row}


ARGS = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "4", "--eval_interval", "2", "--sample_interval", "2",
               "--checkpoint_interval", "2", "--num_samples", "2", "--max_new_tokens", "8", "--wandb", "gpt2-test"]


def test_wandb_history_holds_what_log_txt_holds_and_resume_continues_the_run(tmp_path, capsys):
    full = tmp_path / "full"
    main(ARGS + ["--log_dir", str(full)])
    out = capsys.readouterr().out
    run_id, config, history, path = offline_run(full)
    assert (full / "wandb_id").read_text() == run_id + "\n" and f"-{run_id}" in path
    assert (config["max_steps"], config["n_embd"], config["wandb"], config["autocast_dtype"]) == (4, 32, "gpt2-test",
                                                                                                 "float32")
    # log.txt rounds to 6 (train) and 4 (val) decimals; W&B keeps the float
    for key, tol in (("train", 5e-7), ("val", 5e-5)):
        logged, got = read_log(full / "log.txt", key), stream(history, key)
        assert logged.keys() == got.keys() and max(abs(logged[s] - got[s]) for s in logged) <= tol, key
    assert set(read_log(full / "log.txt", "val")) == {0, 2, 3}
    # the step line's figures at every step, as printed
    for step in range(4):
        line = next(l for l in out.splitlines() if l.startswith(f"step {step:5d} | loss"))
        assert f"lr {history[step]['lr']:.4e} | norm {history[step]['norm']:.4f}" in line
        assert f"{history[step]['tokens_per_s']:,.0f} tok/s" in line
    # the samples, as a table per sampling step (2 and the last, 3), the texts the run printed
    tables = stream(history, "samples/path")
    assert sorted(tables) == [2, 3]
    rows = json.load(open(glob.glob(str(full / "wandb" / "offline-run-*" / "files" / tables[3]))[0]))["data"]
    printed = [l for l in out.splitlines() if l.startswith("sample ")][-2:]
    assert [f"sample {i}: {text!r}" for i, text in rows] == printed

    # killed after the step-2 checkpoint: its log before step 2, the checkpoint and the W&B run's id
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("model_000002.pt", "wandb_id"):
        shutil.copy(full / name, cut)
    (cut / "log.txt").write_text("".join(l for l in open(full / "log.txt") if int(l.split()[0]) < 2))
    main(ARGS + ["--log_dir", str(cut), "--resume"])
    resumed_id, _, resumed, _ = offline_run(cut)
    assert resumed_id == run_id  # the same W&B run, continued (wandb sync uploads both files into it)
    assert sorted(stream(resumed, "train")) == [2, 3]
    assert stream(resumed, "train") == {s: v for s, v in stream(history, "train").items() if s >= 2}  # resume is exact
    assert (cut / "log.txt").read_text() == (full / "log.txt").read_text()


def test_a_skipped_fp16_step_reaches_wandb(tmp_path, monkeypatch):
    from test_precision import plant_inf_in_a_gradient
    plant_inf_in_a_gradient(monkeypatch, at_call=0)
    log = tmp_path / "log"
    main(TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "2", "--eval_interval", "100", "--val_tokens", "128",
                 "--dtype", "float16", "--wandb", "gpt2-test", "--log_dir", str(log)])
    _, _, history, _ = offline_run(log)
    assert read_log(log / "log.txt", "skipped") == stream(history, "skipped") == {0: 1}
    assert history[0]["norm"] == float("inf") and stream(history, "train").keys() == {0, 1}


def test_without_wandb_installed_the_flag_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    msg = expect_error(TINY + ["--data", str(ROOT / "input.txt"), "--wandb", "p", "--log_dir", str(tmp_path / "log")],
                       "--wandb p: the wandb package is not installed; `pip install wandb`")
    assert not (tmp_path / "log").exists() and msg


def test_a_run_without_wandb_never_imports_it(tmp_path):
    (tmp_path / "run.py").write_text("import sys, train_gpt2; train_gpt2.main(sys.argv[1:]); "
                                     "assert 'wandb' not in sys.modules, 'wandb imported'; print('ok')")
    r = launch([*TINY, "--data", ROOT / "input.txt", "--max_steps", "1", "--log_dir", tmp_path / "log"], cwd=ROOT,
               script=tmp_path / "run.py")
    assert r.returncode == 0 and r.stdout.endswith("ok\n"), r.stderr
