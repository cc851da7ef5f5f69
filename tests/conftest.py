import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

# the test machines have no network: never let transformers or datasets try the hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # large real data, beside the checkout; absent on a user's clone


@pytest.fixture
def shared_data():
    if not SHARED.is_dir():
        pytest.skip(f"needs the real data in {SHARED} (not part of the repository)")
    return SHARED


def run_main(main, args):
    """A script's main(args) in this process, as its command line would end: (returncode, stdout, stderr). For
    the tests where the process boundary is not the point: the same code, without a fresh interpreter's imports."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:  # as the interpreter ends: a string is printed to stderr, with exit code 1
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The README's quickstart command, cut to 4 steps, run once as a user runs it: (its folder, the result)."""
    folder = tmp_path_factory.mktemp("quickstart")
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt2.py"), "--preset", "shakespeare", "--max_steps", "4",
                        "--eval_interval", "2", "--val_tokens", "2048"], cwd=folder, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return folder, r
