"""
fineweb.py --download NAME against stand-ins of the Hugging Face hub, never the network: huggingface_hub's own
cache, laid out as it lays it out (datasets--OWNER--NAME/refs/main, snapshots/COMMIT/FILE -> blobs/), with
HF_HUB_OFFLINE=1; and a local HTTP server answering the hub's resolve URLs, with HF_ENDPOINT pointing at it. The
shards are tiny, written here from llm.c's layout (test_bin_shards.write_llmc).
"""
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fineweb
from conftest import run_main
from test_bin_shards import write_llmc
from train_gpt2 import find_data

ROOT = Path(__file__).resolve().parents[1]
REPO = "kjj0/fineweb10B-gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAMES = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, 4)]


def shard_files(folder):
    """llm.c shards of a few hundred tokens each, named as kjj0's: {name: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        write_llmc(folder / name, rng.integers(0, 50257, 300 + 50 * i))
    return {name: (folder / name).read_bytes() for name in NAMES}


def hub_cache(root, files):
    """huggingface_hub's cache of REPO holding `files`: the layout `hf download` leaves, read offline."""
    repo = root / "datasets--kjj0--fineweb10B-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (repo / "snapshots" / COMMIT / name).symlink_to(Path("..", "..", "blobs", blob))
    return repo


def download(*args, env):
    """fineweb.py --download in its own process: huggingface_hub reads HF_* once, at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()} | env
    return subprocess.run([sys.executable, str(ROOT / "fineweb.py"), "--download", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def one_line_error(r, *words):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], f"'{w}' not in: {lines[0]}"


@pytest.fixture
def offline(tmp_path):
    """(the shards' bytes, the cache's snapshot folder, the environment of an offline run on that cache)."""
    files = shard_files(tmp_path / "made")
    repo = hub_cache(tmp_path / "hub", files)
    return files, repo / "snapshots" / COMMIT, {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}


def test_offline_cache_gives_val_and_n_train_shards_that_data_reads(tmp_path, offline):
    files, _, env = offline
    out = tmp_path / "out"
    r = download("fineweb10B", "--shards", 2, "--output_dir", out, env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(NAMES[:3])
    assert all((out / name).read_bytes() == files[name] for name in NAMES[:3])
    assert not list(out.rglob("*.tmp"))
    train, val = find_data(str(out))
    assert [Path(p).name for p in train] == NAMES[1:3] and [Path(p).name for p in val] == NAMES[:1]
    tokens = 300 + 350 + 400
    assert r.stdout.strip().splitlines()[-1] == (
        f"{out}: 3 shards (1 val, 2 train) of {REPO}, {tokens:,} tokens; 3 fetched, 0 already there; "
        f"train on them with --data {out}")

    # a rerun skips the shards it has and fetches only the new one
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    r = download("fineweb10B", "--shards", 3, "--output_dir", out, env=env)
    assert r.returncode == 0, r.stderr
    assert "1 fetched, 3 already there" in r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")} == before | {
        NAMES[3]: (out / NAMES[3]).stat().st_mtime_ns}
    assert (out / NAMES[3]).read_bytes() == files[NAMES[3]]


def test_default_folder_is_the_dataset_name(tmp_path, offline):
    files, _, env = offline
    r = subprocess.run([sys.executable, str(ROOT / "fineweb.py"), "--download", "fineweb10B", "--shards", "1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=os.environ | env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "fineweb10B").glob("*.bin")) == sorted(NAMES[:2])
    assert r.stdout.strip().endswith("--data fineweb10B")


def test_a_bad_shard_in_the_folder_is_replaced(tmp_path, offline):
    files, _, env = offline
    out = tmp_path / "out"
    out.mkdir()
    (out / NAMES[1]).write_bytes(files[NAMES[1]][:-10])  # cut short, as a full disk leaves a copy
    r = download("fineweb10B", "--shards", 1, "--output_dir", out, env=env)
    assert r.returncode == 0, r.stderr
    assert f"shard {out / NAMES[1]} holds" in r.stdout and "replacing it" in r.stdout
    assert all((out / name).read_bytes() == files[name] for name in NAMES[:2])


@pytest.mark.parametrize("damage", ["magic", "short", "long"])
def test_a_bad_shard_in_the_cache_is_one_line_naming_it(tmp_path, offline, damage):
    files, snapshot, env = offline
    data = files[NAMES[2]]
    bad = {"magic": b"\0" * 4 + data[4:], "short": data[:-2], "long": data + b"\0\0"}[damage]
    (snapshot / NAMES[2]).resolve().write_bytes(bad)
    out = tmp_path / "out"
    r = download("fineweb10B", "--shards", 2, "--output_dir", out, env=env)
    one_line_error(r, str(snapshot / NAMES[2]), "Hugging Face cache's copy", "delete it")
    assert {"magic": "magic 0", "short": "cut short", "long": "2 bytes after"}[damage] in r.stderr
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(NAMES[:2])  # the shards before it, whole
    assert not list(out.rglob("*.tmp"))


def test_offline_without_the_shard_is_one_line_naming_the_fix(tmp_path, offline):
    _, snapshot, env = offline
    (snapshot / NAMES[1]).unlink()
    out = tmp_path / "out"
    r = download("fineweb10B", "--shards", 1, "--output_dir", out, env=env)
    one_line_error(r, NAMES[1], REPO, "HF_HUB_OFFLINE=1", "unset it")
    assert [p.name for p in out.glob("*.bin")] == NAMES[:1]


@pytest.mark.parametrize("args, words", [
    (["--download", "fineweb1B"], ["--download takes fineweb10B, finewebedu10B, fineweb100B", "fineweb1B"]),
    (["--download", "fineweb10B", "--shards", 0], ["--shards must be 1 to 103", "got 0"]),
    (["--download", "finewebedu10B", "--shards", 100], ["--shards must be 1 to 99", "kjj0/finewebedu10B-gpt2"]),
    (["--download", "fineweb10B", "--input", "input.txt"], ["drop --input"]),
    (["--input", "input.txt", "--shards", 2], ["--shards goes with --download"]),
])
def test_bad_arguments_are_one_line(tmp_path, args, words):
    # refused before huggingface_hub is asked anything: in this process
    one_line_error(run_main(fineweb.main, [*args, "--output_dir", tmp_path / "out"]), *words)
    assert not (tmp_path / "out").exists()


def test_a_folder_of_npy_shards_is_refused(tmp_path, offline):
    (tmp_path / "npy").mkdir()
    (tmp_path / "npy" / "edufineweb_val_000000.npy").write_bytes(b"")
    r = download("fineweb10B", "--output_dir", tmp_path / "npy", env=offline[2])
    one_line_error(r, ".npy shards", "another --output_dir")


# -----------------------------------------------------------------------------
# a local stand-in of the hub's HTTP API: what hf_hub_download asks of it, HEAD then GET, both at
# /datasets/REPO/resolve/REVISION/FILE, with the headers it needs (X-Repo-Commit, ETag, Content-Length)


class Hub(http.server.BaseHTTPRequestHandler):
    files = {}  # name: bytes
    requests = []  # (method, name, Range header)
    cut = {}  # name: (bytes its first GET sends, then "drop" the connection or "hang")
    release = threading.Event()  # ends a hang

    def resolve(self):
        prefix = f"/datasets/{REPO}/resolve/main/"
        name = self.path.split("?")[0][len(prefix):] if self.path.startswith(prefix) else None
        self.requests.append((self.command, name, self.headers.get("Range")))
        if name not in self.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None, b""
        data = self.files[name]
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        return name, data[start:]

    def do_HEAD(self):
        self.resolve()

    def do_GET(self):
        name, data = self.resolve()
        if name in self.cut:
            sent, then = self.cut.pop(name)
            self.wfile.write(data[:sent])
            self.wfile.flush()
            if then == "hang":
                self.release.wait()
            self.close_connection = True
        else:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    """The environment of a run against a local hub serving the shards of shard_files, train_000002 made bigger
    than huggingface_hub's 10 MiB write chunk: the part of it received before a cut reaches the disk."""
    Hub.files, Hub.requests, Hub.cut = shard_files(tmp_path / "made"), [], {}
    write_llmc(tmp_path / "big.bin", np.random.default_rng(1).integers(0, 50257, 6_000_000))
    Hub.files[NAMES[2]] = (tmp_path / "big.bin").read_bytes()
    Hub.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0",
           "HF_HUB_CACHE": str(tmp_path / "empty_cache"), "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "*"}
    Hub.release.set()
    server.shutdown()
    server.server_close()


def gets():
    return [(name, rng) for method, name, rng in Hub.requests if method == "GET"]


def test_download_from_a_local_hub_resumes_a_dropped_connection(tmp_path, hub):
    Hub.cut = {NAMES[2]: (11 * 2**20, "drop")}
    out = tmp_path / "out"
    r = download("fineweb10B", "--shards", 2, "--output_dir", out, env=hub)
    assert r.returncode == 0, r.stderr
    assert all((out / name).read_bytes() == Hub.files[name] for name in NAMES[:3])
    assert find_data(str(out))[0] == [str(out / name) for name in NAMES[1:3]]
    assert gets() == [(NAMES[0], None), (NAMES[1], None), (NAMES[2], None), (NAMES[2], f"bytes={10 * 2**20}-")]
    assert "3 fetched, 0 already there" in r.stdout

    Hub.requests.clear()
    r = download("fineweb10B", "--shards", 2, "--output_dir", out, env=hub)
    assert r.returncode == 0 and "0 fetched, 3 already there" in r.stdout, r.stderr
    assert Hub.requests == []  # a shard present and whole costs no request at all


def test_killed_download_keeps_its_whole_shards_and_refetches_the_cut_one(tmp_path, hub):
    # huggingface_hub >= 1.18 never resumes a partial file across processes: the unit of resume is the shard
    Hub.cut = {NAMES[2]: (11 * 2**20, "hang")}
    out = tmp_path / "out"
    args = ["fineweb10B", "--shards", 2, "--output_dir", out]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()} | hub
    env["HF_HUB_DOWNLOAD_TIMEOUT"] = "600"  # the hang outlasts the wait below: its 10 s default would resume it
    proc = subprocess.Popen([sys.executable, str(ROOT / "fineweb.py"), "--download", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        # wait for train_000002's part, the only one that grows past 1 MiB; not any part, since a small shard's
        # can be caught between its write and its rename (a race that failed CI once)
        deadline = time.time() + 60
        while not [p for p in out.rglob("*.incomplete") if p.stat().st_size > 2**20]:
            assert proc.poll() is None and time.time() < deadline, "the download ended, or never began"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in out.glob("*.bin")) == NAMES[:2][::-1]  # fineweb_train_... < fineweb_val_...

    Hub.requests.clear()
    r = download(*args, env=hub)
    assert r.returncode == 0, r.stderr
    assert gets() == [(NAMES[2], None)] and "1 fetched, 2 already there" in r.stdout
    assert all((out / name).read_bytes() == Hub.files[name] for name in NAMES[:3])
    assert not list(out.rglob("*.incomplete"))  # the killed run's part, removed


def test_a_shard_the_hub_lacks_is_one_line(tmp_path, hub):
    del Hub.files[NAMES[1]]
    r = download("fineweb10B", "--shards", 1, "--output_dir", tmp_path / "out", env=hub)
    one_line_error(r, f"could not download {NAMES[1]} from {REPO}", "404")


@pytest.mark.slow
def test_unreachable_hub_is_one_line_after_huggingface_hubs_retries(tmp_path, hub):
    unreachable = hub | {"HF_ENDPOINT": "http://127.0.0.1:9"}
    r = download("fineweb10B", "--output_dir", tmp_path / "out", env=unreachable)
    assert r.returncode != 0
    *retries, last = r.stderr.strip().splitlines()  # huggingface_hub's own notices, over ~25 s
    assert all("Connection refused" in line or line.startswith("Retrying") for line in retries)
    assert last == (f"error: could not download {NAMES[0]} from {REPO} (ConnectError: [Errno 111] Connection "
                    "refused); offline? rerun the same command when online: it keeps the shards it has")
