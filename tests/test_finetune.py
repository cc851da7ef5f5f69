"""
Fine-tuning: --init_from a transformers folder (or a .pt), resumed with the same command, at the padded vocab.
The pretrained model here is a tiny GPT exported to a transformers folder: OpenAI's weights need the network.
"""
import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import ROOT
from hf_export import export_hf
from test_train import TINY, assert_same_weights, expect_error, main_1_thread, read_log, run_killed_at
from train_gpt2 import GPT, GPT2_VOCAB, GPTConfig, load_model, main, pad_vocab, parse_args

# the run's flags and no shape flag: the shape is the pretrained model's
FT = ["--data", str(ROOT / "input.txt"), "--batch_size", "4", "--seq_len", "32", "--total_batch_size", "256",
      "--val_tokens", "512", "--no-hellaswag", "--sample_interval", "1000", "--max_lr", "1e-3", "--warmup_steps", "1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A transformers folder holding a GPT of vocab 50257, as OpenAI's are (block_size 64, 2 layers, width 32)."""
    folder = tmp_path_factory.mktemp("pretrained") / "hf"
    torch.manual_seed(0)
    return str(export_hf(GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)), folder))


def test_init_from_pads_the_vocab_and_keeps_the_real_logits(pretrained):
    hf = GPT2LMHeadModel.from_pretrained(pretrained).eval()
    loaded = load_model(pretrained)
    assert loaded.config.vocab_size == GPT2_VOCAB
    padded = pad_vocab(loaded, 50304).eval()
    idx = torch.randint(0, GPT2_VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, logits = hf(idx).logits, padded(idx)[0]
        assert logits.shape[-1] == 50304
        assert (logits[..., :GPT2_VOCAB] - ref).abs().max().item() <= 1e-4  # transformers' logits, unchanged
        # the new rows' logit is the mean m of the real ones. By Jensen the real rows' exp-logits average at least
        # exp(m), so the 47 new rows add at most 47/50257 of the real softmax mass: the loss grows by at most
        # log(1 + 47/50257) = 0.0009 nats
        assert torch.allclose(logits[..., GPT2_VOCAB:], ref.mean(dim=-1, keepdim=True).expand(-1, -1, 47), atol=1e-4)
        grow = (padded(idx, idx)[1] - loaded.eval()(idx, idx)[1]).item()
    assert 0 < grow <= math.log(1 + 47 / GPT2_VOCAB)
    # the tied weight stays tied
    assert padded.lm_head.weight is padded.transformer.wte.weight


def test_finetuning_trains_at_the_padded_vocab_and_export_drops_it_again(pretrained, tmp_path):
    log = tmp_path / "ft"
    main(FT + ["--init_from", pretrained, "--max_steps", "2", "--log_dir", str(log)])
    ckpt = torch.load(log / "model_000002.pt")
    assert ckpt["config"] == dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    main(["--init_from", str(log / "model_000002.pt"), "--export", str(tmp_path / "hf")])
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "hf").config.vocab_size == GPT2_VOCAB


@pytest.mark.slow
def test_killed_finetuning_run_resumes_with_the_same_command(pretrained, tmp_path, monkeypatch, capsys):
    # the case: the command has --init_from and no shape flags; --resume used to compare the checkpoint
    # with the default 124M shape and refuse
    args = FT + ["--init_from", pretrained, "--max_steps", "6", "--checkpoint_interval", "3", "--eval_interval", "2",
                 "--log_dir", "run"]
    (tmp_path / "full").mkdir()
    monkeypatch.chdir(tmp_path / "full")
    main_1_thread(args)  # the oracle, in this process with the killed run's thread count
    r = run_killed_at("4 train", args, tmp_path)  # after the step-3 checkpoint, with steps logged past it
    assert r.returncode == -9, r.stderr
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    main_1_thread(args + ["--resume"])  # the same command, in this process
    assert "resuming at step 3" in capsys.readouterr().out
    assert (tmp_path / "run" / "log.txt").read_text() == (tmp_path / "full" / "run" / "log.txt").read_text()
    assert_same_weights(tmp_path / "full" / "run" / "model_000006.pt", tmp_path / "run" / "model_000006.pt")
    # and without --init_from: the weights come from the checkpoint either way
    main([a for a in args if a != pretrained and a != "--init_from"] + ["--resume", "--max_steps", "7"])
    assert "resuming at step 6" in capsys.readouterr().out


def test_a_shape_flag_that_disagrees_with_the_loaded_model_names_both_values(pretrained, tmp_path):
    msg = expect_error(FT + ["--init_from", pretrained, "--n_layer", "12", "--log_dir", str(tmp_path / "a")],
                       "--n_layer 12 but it has 2")
    assert pretrained in msg and not (tmp_path / "a").exists()
    main(FT + ["--init_from", pretrained, "--max_steps", "1", "--log_dir", str(tmp_path / "b")])
    expect_error(FT + ["--init_from", pretrained, "--max_steps", "2", "--log_dir", str(tmp_path / "b"), "--resume",
                       "--block_size", "32", "--n_layer", "2"], "--block_size 32 but it has 64")
    # a flag that agrees is fine
    main(FT + ["--init_from", pretrained, "--max_steps", "2", "--log_dir", str(tmp_path / "b"), "--resume",
               "--n_layer", "2"])
    assert len(read_log(tmp_path / "b" / "log.txt", "train")) == 2


def test_init_from_a_checkpoint_takes_its_weights_not_its_optimizer(tmp_path):
    base = TINY + ["--data", str(ROOT / "input.txt")]
    main(base + ["--max_steps", "3", "--log_dir", str(tmp_path / "pre")])
    main(base + ["--max_steps", "1", "--init_from", str(tmp_path / "pre" / "model_000003.pt"), "--log_dir",
                 str(tmp_path / "ft")])
    pre, ft = torch.load(tmp_path / "pre" / "model_000003.pt"), torch.load(tmp_path / "ft" / "model_000001.pt")
    # a fresh AdamW: one step taken, not four; and the new run's own schedule (warmup's first step)
    assert {s["step"].item() for s in ft["optimizer"]["state"].values()} == {1.0}
    assert ft["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 3)
    assert ft["step"] == 1 and pre["step"] == 3
    # its first loss is the pretrained model's on that batch: the weights did carry over
    first = read_log(tmp_path / "ft" / "log.txt", "train")[0]
    assert first < read_log(tmp_path / "pre" / "log.txt", "train")[0] - 0.01


def test_finetune_preset_is_nanogpts_constant_lr_recipe_and_runs_offline_on_a_folder(pretrained, tmp_path, capsys):
    model_cfg, cfg, sample_cfg, given = parse_args(["--preset", "shakespeare-finetune"])
    assert cfg.init_from == "gpt2" and cfg.max_lr == cfg.min_lr == 3e-5 and cfg.warmup_steps == 0
    assert cfg.data.endswith("input.txt") and cfg.total_batch_size == 32768 and not given & {"n_layer", "n_embd"}
    # offline: the preset with a local folder (and a micro-batch the tiny model's context allows)
    main(["--preset", "shakespeare-finetune", "--init_from", pretrained, "--seq_len", "64", "--batch_size", "4",
          "--total_batch_size", "256", "--max_steps", "3", "--val_tokens", "512", "--log_dir", str(tmp_path / "ft")])
    out = capsys.readouterr().out
    assert out.count("lr 3.0000e-05") == 3 and "sample 0: 'ROMEO:" in out
    # offline without a folder: one line that says what to pass
    expect_error(["--preset", "shakespeare-finetune", "--log_dir", str(tmp_path / "x")], "pass a local folder")
