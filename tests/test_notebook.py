import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT
from train_gpt2 import main

FIXTURE = ROOT / "tests" / "fixtures" / "hellaswag_val_100.jsonl"


def run_notebook(folder, plots_only=False):
    """play.ipynb as committed, run in `folder` as a user would open it there: its text output."""
    nb = nbformat.read(folder / "play.ipynb", as_version=4)
    if plots_only:  # the training plots, without the part that builds and samples a 124M model
        nb.cells = nb.cells[:next(i for i, c in enumerate(nb.cells) if "plt.show()" in c.source) + 1]
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == (1 if plots_only else 2)  # the training plots, the position embeddings
    return "".join(o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_play_notebook_plots_the_quickstart_log_and_a_hellaswag_run_unedited(tmp_path, monkeypatch, quickstart):
    nb = nbformat.read(ROOT / "play.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit play.ipynb without outputs"
    shutil.copy(ROOT / "play.ipynb", tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports train_gpt2, as it does beside it
    # the README's quickstart, shortened (its log.txt); and a run with HellaSwag, as the 124M recipe logs it
    (tmp_path / "log_shakespeare").mkdir()
    shutil.copy(quickstart[0] / "log_shakespeare" / "log.txt", tmp_path / "log_shakespeare")
    ten = tmp_path / "hellaswag_10.jsonl"  # the notebook plots the accuracy; 10 examples are enough for a line
    ten.write_text("".join(FIXTURE.read_text().splitlines(keepends=True)[:10]))
    main(["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "256", "--batch_size", "8",
          "--seq_len", "32", "--total_batch_size", "4096", "--max_steps", "6", "--eval_interval", "3",
          "--val_tokens", "512", "--data", str(ROOT / "input.txt"), "--log_dir", str(tmp_path / "log"),
          "--hellaswag_data", str(ten), "--sample_interval", "1000", "--checkpoint_interval", "1000"])
    text = run_notebook(tmp_path)
    lines = text.splitlines()
    quick = next(l for l in lines if l.startswith("log_shakespeare/log.txt 4,096 tokens/step"))
    assert "'train': '4 points" in quick and "'val': '3 points" in quick and "hella" not in quick
    tiny = next(l for l in lines if l.startswith("log/log.txt 4,096 tokens/step"))
    assert "'train': '6 points" in tiny and "'hella': '3 points" in tiny
    assert "no HellaSwag in log_shakespeare (trained with --no-hellaswag, or without its data)" in lines
    assert "tokens axis: 4,096 tokens/step" in lines
    assert "Hello, I'm a language model," in text


def test_play_notebook_says_where_it_looked_when_there_is_no_log(tmp_path, monkeypatch):
    shutil.copy(ROOT / "play.ipynb", tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    text = run_notebook(tmp_path, plots_only=True)
    assert f"no log*/log.txt in {tmp_path}: train first (python train_gpt2.py --preset shakespeare)" in text


def test_play_notebook_plots_the_one_and_four_epoch_runs_together(tmp_path, monkeypatch):
    # the logs the 124M presets write, as train_gpt2.py writes them (a point every 4,000 steps here)
    shutil.copy(ROOT / "play.ipynb", tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    for folder, steps in (("log", 19073), ("log_gpt2_4epochs", 76292)):
        (tmp_path / folder).mkdir()
        points = list(range(0, steps, 4000)) + [steps - 1]
        (tmp_path / folder / "log.txt").write_text("0 tokens_per_step 524288\n" + "".join(
            f"{s} val {4 - s / steps:.4f}\n{s} hella {0.25 + 0.08 * s / steps:.4f}\n{s} train {4 - s / steps:.6f}\n"
            for s in points))
    lines = run_notebook(tmp_path, plots_only=True).splitlines()
    assert any(l.startswith("log/log.txt 524,288 tokens/step") and "last 0.3300 at step 19072" in l for l in lines)
    assert any(l.startswith("log_gpt2_4epochs/log.txt 524,288 tokens/step") and "last 0.3300 at step 76291" in l
               for l in lines)
    assert "tokens axis: 524,288 tokens/step" in lines and not any("no HellaSwag" in l for l in lines)
