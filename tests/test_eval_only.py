"""
--eval_only: any model's val loss on your own val tokens and its HellaSwag, as a run's eval step measures them,
with nothing written: what puts OpenAI's 3.2924 and 0.2955 beside a run on the same data.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

import eval_only
import hellaswag
from conftest import ROOT, launch, run_main
from devices import resolve_precision
from hf_export import export_hf
from memory_plan import HELLASWAG_BATCH
from test_train import TINY, expect_error
from train_gpt2 import GPT, GPTConfig, get_tokenizer, load_model, main

FIXTURE_33 = ROOT / "tests" / "fixtures" / "hellaswag_val_33.jsonl"
# a model of GPT-2's own 50,257 tokens (no padding rows), so that its export to transformers is the same model
EVAL = ["--data", str(ROOT / "input.txt"), "--seq_len", "32", "--batch_size", "4", "--val_tokens", "1000"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    log = tmp_path_factory.mktemp("run") / "log"
    main(TINY + ["--vocab_size", "50257", "--data", str(ROOT / "input.txt"), "--max_steps", "3",
                 "--log_dir", str(log)])
    return log


def result(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_eval_only_val_loss_equals_transformers_on_the_same_tokens(run, tmp_path):
    before = sorted(os.listdir(run)), (run / "log.txt").read_text()
    got = result(run_main(main, ["--eval_only", "--log_dir", run, "--no-hellaswag"] + EVAL))  # the newest .pt
    assert got["model"] == str(run / "model_000003.pt") and got["val_tokens"] == 31 * 32
    assert (sorted(os.listdir(run)), (run / "log.txt").read_text()) == before  # nothing written
    # the oracle: transformers' GPT-2 with the checkpoint's weights, on the first 31 windows of 33 tokens of the
    # last 10% of input.txt's tokens (what --data input.txt holds out for val)
    hf = GPT2LMHeadModel.from_pretrained(export_hf(load_model(got["model"]), tmp_path / "hf")).eval()
    tokens = get_tokenizer().encode_ordinary((ROOT / "input.txt").read_text())
    val = torch.tensor(tokens[int(0.9 * len(tokens)):])
    windows = torch.stack([val[q * 32:q * 32 + 33] for q in range(31)])
    with torch.no_grad():  # each window's first 32 tokens predict its last 32
        logits = hf(input_ids=windows[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1)).item()
    assert got["val_loss"] == pytest.approx(loss, abs=1e-5)


def test_eval_only_under_torchrun_equals_one_process_and_scores_hellaswag(run, tmp_path):
    args = ["--eval_only", "--init_from", str(run / "model_000003.pt"), "--hellaswag_data", str(FIXTURE_33)] + EVAL
    one = result(run_main(main, args))
    r = launch(args, cwd=tmp_path, ranks=2)
    two = result(r)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
    # the fixture's 33 examples less the 3 whose endings leave a 32-token model no context
    assert (two["hellaswag_examples"], two["hellaswag_acc_norm"]) == (30, one["hellaswag_acc_norm"])
    assert f"\n{run / 'model_000003.pt'} | val loss {one['val_loss']:.4f}\n" in r.stdout  # as a run's eval step
    assert f"\n{run / 'model_000003.pt'} | HellaSwag acc_norm {round(30 * one['hellaswag_acc_norm'])}/30 = " in r.stdout
    assert os.listdir(tmp_path) == []  # no log folder on any rank


def test_eval_only_runs_every_forward_without_autograd(run, monkeypatch):
    # a graph kept per val batch is what ran a 24-40 GB card out of memory at --batch_size 64
    grad_enabled = []

    def load(source):
        model = load_model(source)
        model.register_forward_hook(lambda module, args, out: grad_enabled.append(torch.is_grad_enabled()))
        return model
    monkeypatch.setattr(eval_only, "load_model", load)
    args = ["--eval_only", "--init_from", run / "model_000003.pt", "--hellaswag_data", FIXTURE_33] + EVAL
    result(run_main(main, args))
    # val's 31 sequences 4 at a time, HellaSwag's 30 examples 16 at a time
    assert len(grad_enabled) == 8 + 2 and not any(grad_enabled)


@pytest.mark.parametrize("block_size", [32, 1024])
def test_the_plans_hellaswag_batch_is_its_first_and_longest(block_size):
    # the memory plan's HellaSwag forward: HELLASWAG_BATCH examples of 4 rows of longest_row tokens (cut to
    # a block_size of 32)
    examples, _ = hellaswag.fit_to_block(hellaswag.load_examples("val", data=str(FIXTURE_33)), block_size)
    model = GPT(GPTConfig(block_size=block_size, n_layer=1, n_head=2, n_embd=32))
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    hellaswag.evaluate_ranks(model, examples, 0, 1, torch.device("cpu"),
                             resolve_precision("float32", torch.device("cpu")), False)
    assert shapes[0] == (4 * HELLASWAG_BATCH, eval_only.longest_row(examples, block_size)), shapes
    assert max(T for _, T in shapes) == shapes[0][1] and (shapes[0][1] == 32) == (block_size == 32)


def test_eval_only_without_a_model_or_with_sample_is_one_line(tmp_path):
    expect_error(["--eval_only", "--log_dir", str(tmp_path / "none")] + EVAL, "--eval_only: no model to evaluate")
    expect_error(["--eval_only", "--sample", "--init_from", "x.pt"], "--eval_only evaluates and exits")
