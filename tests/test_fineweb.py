import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fineweb
from conftest import run_main
from train_gpt2 import EOT, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = (ROOT / "input.txt").read_bytes().decode("utf-8")  # as fineweb.py reads it: \r\n kept

# documents that straddle shards, empty ones, non-ASCII text and the EOT marker written out as text
# (encode_ordinary must treat it as ordinary text, or the shards would hold a fake document boundary)
DOCS = [SHAKESPEARE[:60_000], "", "naïve café, 日本語, emoji 🙂\r\nand a literal <|endoftext|> inside",
        SHAKESPEARE[60_000:61_000], SHAKESPEARE[100_000:180_000], "x", "", SHAKESPEARE[-5_000:]]


def fineweb_cli(*args, process=False):
    """fineweb.py's command line; in this process (run_main) unless the process boundary is the point."""
    if process:
        return subprocess.run([sys.executable, str(ROOT / "fineweb.py"), *map(str, args)],
                              capture_output=True, text=True, timeout=120)
    return run_main(fineweb.main, args)


def make_shards(out, *args):
    fineweb.main(["--output_dir", str(out), "--prefix", "t", *map(str, args)])
    return sorted(out.glob("t_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def decode_documents(shards):
    """The documents in the shards, in order, with tiktoken's own decoder."""
    tokens = np.concatenate([np.load(s) for s in shards])
    assert tokens[0] == EOT, "every document, the first included, starts with EOT"
    starts = np.flatnonzero(tokens == EOT)
    enc = get_tokenizer()
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("t_*.npy"))}


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_inputs(tmp_path, kind, docs):
    if kind == "txt":  # one document per file, in the order the glob sorts them
        for i, d in enumerate(docs):
            (tmp_path / f"doc_{i:03d}.txt").write_bytes(d.encode("utf-8"))
        return [str(tmp_path / "doc_*.txt")]
    if kind == "jsonl":
        return [write_jsonl(tmp_path / "docs.jsonl", docs)]
    # two parquet files of small row groups: documents cross row-group and file boundaries
    pq.write_table(pa.table({"text": docs[:5]}), tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": docs[5:]}), tmp_path / "b.parquet", row_group_size=2)
    return [tmp_path / "a.parquet", tmp_path / "b.parquet"]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_shards_decode_to_source_documents(tmp_path, kind):
    inputs = write_inputs(tmp_path, kind, DOCS)
    shards = make_shards(tmp_path / "out", "--input", *inputs, "--shard_size", 7_000, "--num_proc", 2)
    assert len(shards) > 5
    assert decode_documents(shards) == [d for d in DOCS if d]
    meta = fineweb.read_meta(tmp_path / "out", "t")
    assert meta["complete"]
    assert meta["documents"] == 6 and meta["empty_documents"] == 2
    assert sum(s["documents"] for s in meta["shards"]) == 6


def test_shard_tokens_are_eot_plus_encode_ordinary_ids(tmp_path):
    # a lone surrogate (valid in JSON, not in UTF-8) takes encode_ordinary's replacement path
    docs = DOCS + ["broken \ud800 surrogate"]
    inputs = write_inputs(tmp_path, "jsonl", docs)
    shards = make_shards(tmp_path / "out", "--input", *inputs, "--shard_size", 7_000)
    enc = get_tokenizer()
    expected = [t for d in docs if d for t in [EOT] + enc.encode_ordinary(d)]
    assert np.concatenate([np.load(s) for s in shards]).tolist() == expected


def test_shard_names_sizes_dtype_and_metadata(tmp_path):
    out = tmp_path / "out"
    shards = make_shards(out, "--input", ROOT / "input.txt", "--shard_size", 50_000, "--num_proc", 1)
    total = 1 + len(get_tokenizer().encode_ordinary(SHAKESPEARE))
    n_full, rest = divmod(total, 50_000)
    assert rest > 0, "the test needs a last, partial shard"
    assert [p.name for p in shards] == ["t_val_000000.npy"] + [f"t_train_{i:06d}.npy" for i in range(1, n_full + 1)]
    arrays = [np.load(p) for p in shards]
    assert all(a.dtype == np.uint16 for a in arrays)
    assert [len(a) for a in arrays] == [50_000] * n_full + [rest]
    meta = json.loads((out / "t_meta.json").read_text())
    assert meta["shard_size"] == 50_000 and meta["tokenizer"] == "gpt2" and meta["complete"]
    assert [(s["file"], s["split"], s["tokens"]) for s in meta["shards"]] == \
        [(p.name, "val" if i == 0 else "train", len(a)) for i, (p, a) in enumerate(zip(shards, arrays))]
    assert meta["tokens"] == total and meta["documents"] == 1
    assert fineweb.shard_files(out, "t", "val") == [str(shards[0])]
    assert fineweb.shard_files(out, "t", "train") == [str(p) for p in shards[1:]]


def test_num_proc_1_and_2_give_identical_shards(tmp_path, monkeypatch):
    # many small documents in many small batches, so that two workers really interleave
    docs = SHAKESPEARE.split("\n\n") + [""] * 3
    inputs = write_inputs(tmp_path, "jsonl", docs)
    monkeypatch.setattr(fineweb, "BATCH_CHARS", 5_000)
    make_shards(tmp_path / "one", "--input", *inputs, "--shard_size", 30_000, "--num_proc", 1)
    shards = make_shards(tmp_path / "two", "--input", *inputs, "--shard_size", 30_000, "--num_proc", 2)
    one, two = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert len(one) > 5 and one == two
    assert decode_documents(shards) == [d for d in docs if d]


def test_spawn_start_method_gives_same_shards(tmp_path):
    # macOS and Windows start workers with spawn, which re-imports fineweb.py in every worker: it must
    # run nothing on import, and the workers must not rely on anything that fork would have inherited
    inputs = write_inputs(tmp_path, "jsonl", DOCS)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import multiprocessing\n"
                                                        "multiprocessing.set_start_method('spawn')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    args = ["--input", *inputs, "--prefix", "t", "--shard_size", 7_000, "--num_proc", 2]
    r = subprocess.run([sys.executable, ROOT / "fineweb.py", *map(str, args), "--output_dir", tmp_path / "spawn"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and not r.stderr, r.stderr
    make_shards(tmp_path / "fork", *args)
    assert len(shard_bytes(tmp_path / "fork")) > 5 and shard_bytes(tmp_path / "spawn") == shard_bytes(tmp_path / "fork")


def test_hf_dataset_path_matches_local_input(tmp_path):
    # --dataset goes through datasets.load_dataset; a local folder of jsonl works offline
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", DOCS)
    make_shards(tmp_path / "hf", "--dataset", tmp_path / "ds", "--split", "train", "--streaming",
                "--shard_size", 7_000, "--num_proc", 2)
    make_shards(tmp_path / "local", "--input", tmp_path / "ds" / "train.jsonl", "--shard_size", 7_000)
    hf = shard_bytes(tmp_path / "hf")
    assert len(hf) > 5 and hf == shard_bytes(tmp_path / "local")


# fineweb.py that stops itself (SIGSTOP) once the metadata of its second shard is saved: the test then
# signals it at a known point of the run, however slow or loaded the machine
STOP_AFTER_2_SHARDS = """
import os, signal, sys, fineweb
# Ctrl-C as in a terminal: a shell starts background jobs (pytest &) with SIGINT ignored, and children inherit it
signal.signal(signal.SIGINT, signal.default_int_handler)
save_meta = fineweb.save_meta
def save_then_stop(output_dir, prefix, meta):
    save_meta(output_dir, prefix, meta)
    if len(meta["shards"]) == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
fineweb.save_meta = save_then_stop
fineweb.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, num_proc", [(signal.SIGKILL, 1), (signal.SIGINT, 2)], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_to_identical_shards(tmp_path, sig, num_proc):
    inputs = write_inputs(tmp_path, "jsonl", [SHAKESPEARE] * 12 + ["", SHAKESPEARE[:1234]])  # ~4M tokens, ~1 s
    args = ["--input", *inputs, "--prefix", "t", "--shard_size", 200_000, "--num_proc", num_proc]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", STOP_AFTER_2_SHARDS, *map(str, args), "--output_dir", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once it has stopped itself (or, wrongly, ended)
    assert os.WIFSTOPPED(status), f"fineweb.py ended before its second shard: {proc.stderr.read()}"
    proc.send_signal(sig)  # a SIGINT waits, pending, until SIGCONT wakes the process
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    if sig == signal.SIGINT:
        assert stderr.strip().splitlines() == ["interrupted: rerun the same command to continue "
                                               "after the last complete shard"]
    meta = fineweb.read_meta(out, "t")
    assert not meta["complete"], "the run was not stopped part way: make the input bigger"
    # running counts: the one empty document comes near the end; the document being cut is counted once
    last = meta["shards"][-1]
    assert meta["documents"] == last["next_document"] + (last["next_token"] > 0) and meta["empty_documents"] == 0
    (out / "t_train_000099.npy.tmp").write_bytes(b"half a shard")  # as a kill during a write leaves it
    done_before = {s["file"]: (out / s["file"]).read_bytes() for s in meta["shards"]}

    r = fineweb_cli(*args, "--output_dir", out)
    assert r.returncode == 0, r.stderr
    assert f"resuming after {len(meta['shards'])} complete shards" in r.stdout
    make_shards(tmp_path / "whole", *args)  # uninterrupted
    resumed = shard_bytes(out)
    assert len(resumed) > 15 and resumed == shard_bytes(tmp_path / "whole")
    assert all(resumed[name] == data for name, data in done_before.items())
    assert not list(out.glob("*.tmp"))
    assert fineweb.read_meta(out, "t") == fineweb.read_meta(tmp_path / "whole", "t")


def test_interrupted_shard_write_leaves_no_tmp(tmp_path, monkeypatch):
    save, calls = np.save, []

    def save_then_interrupt(f, tokens):  # Ctrl-C half way through writing the third shard
        calls.append(1)
        if len(calls) == 3:
            f.write(b"half a shard")
            raise KeyboardInterrupt
        save(f, tokens)
    monkeypatch.setattr(np, "save", save_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        make_shards(out, "--input", ROOT / "input.txt", "--shard_size", 50_000)
    assert e.value.code == 130
    assert sorted(p.name for p in out.iterdir()) == ["t_meta.json", "t_train_000001.npy", "t_val_000000.npy"]
    assert len(fineweb.read_meta(out, "t")["shards"]) == 2


def test_rerun_of_a_complete_folder_changes_nothing(tmp_path):
    args = ["--input", ROOT / "input.txt", "--shard_size", 100_000]
    make_shards(tmp_path, *args)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    r = fineweb_cli(*args, "--output_dir", tmp_path, "--prefix", "t")
    assert r.returncode == 0 and "already complete" in r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


# -----------------------------------------------------------------------------
# bad input: one line on stderr, a non-zero exit, and no shard (or half of one) left behind


def assert_refused(r, out, *words):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], f"'{w}' not in: {lines[0]}"
    assert not list(out.glob("*.npy")) and not list(out.glob("*.tmp"))  # (nothing, where out does not exist)


BAD_INPUTS = {
    "missing file": (["--input", "{tmp}/nope.txt"], ["nope.txt", "does not exist"]),
    "glob matching nothing": (["--input", "{tmp}/nothing_*.jsonl"], ["no file matches"]),
    "not json": (["--input", "{tmp}/bad.jsonl"], ["bad.jsonl", "line 3", "not valid JSON"]),
    "missing text field": (["--input", "{tmp}/other.jsonl"], ["other.jsonl", "line 1", "'text'", "--text_field"]),
    "missing parquet column": (["--input", "{tmp}/other.parquet"], ["other.parquet", "'text'", "--text_field"]),
    "shard_size 0": (["--input", "{tmp}/ok.jsonl", "--shard_size", "0"], ["--shard_size", ">= 1"]),
    "shard_size beyond memory": (["--input", "{tmp}/ok.jsonl", "--shard_size", str(10**15)], ["memory", "--shard_size"]),
    "too small for a train shard": (["--input", "{tmp}/ok.jsonl", "--shard_size", "100000"],
                                    ["not enough", "train shard", "smaller --shard_size"]),
    "only empty documents": (["--input", "{tmp}/empty.jsonl"], ["no text"]),
    "offline hub dataset": (["--dataset", "HuggingFaceFW/fineweb-edu"], ["--input", "fineweb-edu"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_error_and_no_shard(tmp_path, case):
    write_jsonl(tmp_path / "ok.jsonl", ["a short document", "and another one"])
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": "cut off\n{"text": "x"}\n')
    write_jsonl(tmp_path / "other.jsonl", ["the text is in another field"], field="content")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "other.parquet")
    args, words = BAD_INPUTS[case]
    out = tmp_path / "out"
    # one case through a real process: exactly one line on its stderr, nothing else printed
    r = fineweb_cli(*[a.format(tmp=tmp_path) for a in args], "--output_dir", out, "--prefix", "t",
                    process=case == "missing file")
    assert_refused(r, out, *words)


def test_bad_json_line_after_some_shards_leaves_only_complete_shards(tmp_path):
    path = tmp_path / "late.jsonl"
    write_jsonl(path, [SHAKESPEARE] * 4)  # a batch each: with one process, each is written before the next is read
    with open(path, "a") as f:
        f.write("{not json}\n")
    out = tmp_path / "out"
    r = fineweb_cli("--input", path, "--output_dir", out, "--prefix", "t", "--shard_size", 100_000, "--num_proc", 1)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == \
        [f"error: {path}, line 5: not valid JSON (Expecting property name enclosed in double quotes, column 2)"]
    meta = fineweb.read_meta(out, "t")
    assert len(meta["shards"]) > 3 and not meta["complete"]
    assert sorted(p.name for p in out.glob("t_*.npy")) == sorted(s["file"] for s in meta["shards"])
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("change", ["source", "shard_size"])
def test_folder_of_another_source_is_refused_unless_overwrite(tmp_path, change):
    a = write_jsonl(tmp_path / "a.jsonl", [SHAKESPEARE[:30_000]])
    b = write_jsonl(tmp_path / "b.jsonl", [SHAKESPEARE[30_000:60_000]])
    out = tmp_path / "out"
    make_shards(out, "--input", a, "--shard_size", 2_000)
    before = shard_bytes(out)
    second = ["--input", b if change == "source" else a, "--shard_size", 2_000 if change == "source" else 3_000]
    r = fineweb_cli(*second, "--output_dir", out, "--prefix", "t")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert ("another source" if change == "source" else "--shard_size 2000") in r.stderr and "--overwrite" in r.stderr
    assert shard_bytes(out) == before
    shards = make_shards(out, *second, "--overwrite")
    assert decode_documents(shards) == [SHAKESPEARE[30_000:60_000] if change == "source" else SHAKESPEARE[:30_000]]
    assert len(shards) == len(fineweb.read_meta(out, "t")["shards"])  # no shard of the first run is left


def test_shards_without_metadata_are_refused(tmp_path):
    (tmp_path / "t_train_000001.npy").write_bytes(b"someone else's shard")
    r = fineweb_cli("--input", ROOT / "input.txt", "--output_dir", tmp_path, "--prefix", "t")
    assert r.returncode != 0 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "t_train_000001.npy").read_bytes() == b"someone else's shard"


@pytest.mark.slow
def test_gutenberg_shards_decode_to_the_books(tmp_path, shared_data):
    path = shared_data / "gutenberg" / "gutenberg_books.jsonl"
    shards = make_shards(tmp_path, "--input", path, "--shard_size", 5_000_000, "--num_proc", 2)
    books = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    assert len(books) == 111 and len(shards) == 4
    assert decode_documents(shards) == books
