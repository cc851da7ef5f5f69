import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT
from train_gpt2 import main


@pytest.mark.slow
def test_play_notebook_plots_a_real_training_log(tmp_path):
    log_dir = tmp_path / "log"
    main(["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "256", "--batch_size", "4",
          "--seq_len", "32", "--total_batch_size", "128", "--max_steps", "6", "--eval_interval", "3",
          "--val_tokens", "512", "--data", str(ROOT / "input.txt"), "--log_dir", str(log_dir),
          "--hellaswag_data", str(ROOT / "tests" / "fixtures" / "hellaswag_val_100.jsonl"),
          "--sample_interval", "1000", "--checkpoint_interval", "1000"])
    nb = nbformat.read(ROOT / "play.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit play.ipynb without outputs"
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'LOGS = ["log/log.txt"]' in first.source
    first.source = first.source.replace('LOGS = ["log/log.txt"]', f"LOGS = [{json.dumps(str(log_dir / 'log.txt'))}]")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the training plots, the position embeddings
    text = "".join(o.get("text", "") for o in outputs)
    assert "train" in text and "hella" in text and "6 points" in text  # 6 train steps were read
    assert "Hello, I'm a language model," in text
