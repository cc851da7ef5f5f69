import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hellaswag
from conftest import run_main
from train_gpt2 import GPT, GPT2_VOCAB, UsageError, get_tokenizer, load_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("fixtures") / "hellaswag_val_100.jsonl"  # the first 100 val examples


@pytest.fixture(scope="module")
def examples():
    return hellaswag.load_examples(data=FIXTURE)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny randomly initialised GPT2LMHeadModel saved by transformers (the longest fixture row is 86 tokens)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, n_positions=128, n_layer=2, n_head=2, n_embd=32))
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(hf_folder):
    return load_model(str(hf_folder), "cpu")


@pytest.fixture(scope="module")
def reference(hf_folder, examples):
    """Per-ending (sum, mean) loss, shape (N, 4, 2), by the HF model itself, one ending and one token at a time."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    enc = get_tokenizer()
    scores = []
    with torch.no_grad():
        for ex in examples:
            ctx = enc.encode(ex["ctx"])
            per_ending = []
            for ending in ex["endings"]:
                end = enc.encode(" " + ending)
                logits = hf(torch.tensor([ctx + end]), use_cache=False).logits[0]
                # the rows that predict the ending's tokens (log_softmax is row by row: the others are not needed)
                logprobs = F.log_softmax(logits[len(ctx) - 1:len(ctx) + len(end) - 1].double(), dim=-1)
                losses = [-logprobs[k, tok].item() for k, tok in enumerate(end)]
                per_ending.append((sum(losses), sum(losses) / len(losses)))
            scores.append(per_ending)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.fixture(scope="module")
def one_at_a_time(model, examples):
    """Per-ending (sum, mean) loss, shape (N, 4, 2), by our scoring with one example per forward pass."""
    scores = []
    with torch.no_grad():
        for ex in examples:
            tokens, mask, _ = hellaswag.render_example(ex)
            scores.append(torch.stack(hellaswag.ending_losses(model, tokens, mask), dim=1))
    return torch.stack(scores).double()


def counts(scores, examples):
    """(examples, correct by lowest sum loss, correct by lowest mean loss) from per-ending scores (N, 4, 2)."""
    labels = torch.tensor([ex["label"] for ex in examples])
    correct = (scores[:, :, 0].argmin(dim=1) == labels).sum().item()
    correct_norm = (scores[:, :, 1].argmin(dim=1) == labels).sum().item()
    return len(examples), correct, correct_norm


def run_cli(*args, cwd=None, env=None):
    """hellaswag.py's command line: in this process (run_main), or in a process of its own in cwd with env."""
    if cwd is None and env is None:
        return run_main(hellaswag.main, args)
    return subprocess.run([sys.executable, "hellaswag.py", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


# -----------------------------------------------------------------------------
# rendering


def test_render_example_tokens_and_mask_hand_checked(examples):
    tokens, mask, label = hellaswag.render_example(examples[0])
    # "A man is sitting on a roof. he" + " is using wrap to wrap a pair of skis." and 3 more endings
    enc = get_tokenizer()
    ctx_len = 9  # A| man| is| sitting| on| a| roof|.| he
    ending_lens = [11, 6, 8, 9]  # " sk|is|." in the first, " rub|ik|'s" in the third, " roof|ing" in the fourth
    assert label == 3
    assert tokens.shape == mask.shape == (4, ctx_len + 11)
    assert [enc.decode([t]) for t in tokens[0, :ctx_len].tolist()] == \
        ["A", " man", " is", " sitting", " on", " a", " roof", ".", " he"]
    assert all(tokens[i, :ctx_len].tolist() == tokens[0, :ctx_len].tolist() for i in range(4))
    # each ending is encoded with its leading space: " is" / " starts" as one token each
    assert enc.decode(tokens[1, ctx_len:ctx_len + 6].tolist()) == " is ripping level tiles off."
    assert enc.decode([tokens[3, ctx_len].item()]) == " starts"
    for i, n in enumerate(ending_lens):
        assert mask[i].tolist() == [0] * ctx_len + [1] * n + [0] * (11 - n)
        assert tokens[i, ctx_len + n:].tolist() == [0] * (11 - n)  # padding


# -----------------------------------------------------------------------------
# scoring, against a reference computed with the HF model itself


def test_ending_losses_match_hf_reference(one_at_a_time, reference):
    torch.testing.assert_close(one_at_a_time[:, :, 0], reference[:, :, 0], atol=1e-4, rtol=1e-5)  # sums
    torch.testing.assert_close(one_at_a_time[:, :, 1], reference[:, :, 1], atol=1e-5, rtol=1e-5)  # means


def test_acc_and_acc_norm_match_hf_reference(model, examples, reference):
    assert hellaswag.evaluate(model, examples, "cpu", batch_size=16) == counts(reference, examples)


def test_batched_scoring_equals_one_example_at_a_time(model, examples, one_at_a_time):
    # 7 examples (28 rows of mixed lengths) per forward, and a ragged last batch
    assert hellaswag.evaluate(model, examples, "cpu", batch_size=7) == counts(one_at_a_time, examples)


def test_rank_shards_add_up_to_the_whole(model, examples):
    examples = examples[:40]
    shards = [hellaswag.evaluate(model, examples, "cpu", batch_size=1, rank=r, world_size=3) for r in range(3)]
    assert [s[0] for s in shards] == [14, 13, 13]
    assert tuple(map(sum, zip(*shards))) == hellaswag.evaluate(model, examples, "cpu", batch_size=8)


def test_padded_vocab_entries_are_ignored(model, examples):
    # our training config pads the vocab to 50304; the 47 extra logits must not enter the softmax
    padded = GPT(dataclasses.replace(model.config, vocab_size=50304))
    sd = model.state_dict()
    extra = 10 * torch.randn(50304 - GPT2_VOCAB, model.config.n_embd)  # large, so leaking them would show
    sd = {k: torch.cat([v, extra]) if k in ("transformer.wte.weight", "lm_head.weight") else v for k, v in sd.items()}
    padded.load_state_dict(sd)
    tokens, mask, _ = hellaswag.render_example(examples[0])
    with torch.no_grad():
        torch.testing.assert_close(hellaswag.ending_losses(padded, tokens, mask),
                                   hellaswag.ending_losses(model, tokens, mask))
    assert hellaswag.evaluate(padded, examples[:20], "cpu") == hellaswag.evaluate(model, examples[:20], "cpu")


def test_evaluate_restores_training_mode(model, examples):
    model.train()
    hellaswag.evaluate(model, examples[:4], "cpu")
    assert model.training
    model.eval()
    hellaswag.evaluate(model, examples[:4], torch.device("cpu"))  # train_gpt2.py passes a torch.device
    assert not model.training


def test_hf_folder_and_pt_checkpoint_score_the_same(hf_folder, model, examples, reference, tmp_path, monkeypatch,
                                                    capsys):
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, ckpt)
    results = []
    capsys.readouterr()
    for name in (hf_folder, ckpt):  # hellaswag.py's main, in this process (its errors have tests of their own)
        monkeypatch.setattr(sys, "argv", ["hellaswag.py", "-m", str(name), "--data", str(FIXTURE), "-d", "cpu",
                                          "--batch_size", "8", "--limit", "30"])
        hellaswag.main()
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))  # the JSON: the last line
    n, correct, correct_norm = counts(reference[:30], examples[:30])
    assert results[0] == results[1] == {"examples": n, "acc": correct / n, "acc_norm": correct_norm / n}


# -----------------------------------------------------------------------------
# data


def test_load_examples_file_folder_and_limit(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "hellaswag_val.jsonl")
    from_file = hellaswag.load_examples(data=FIXTURE)
    assert len(from_file) == 100 and from_file[0]["label"] == 3
    assert hellaswag.load_examples("val", data=tmp_path) == from_file
    assert hellaswag.load_examples(data=FIXTURE, limit=10) == from_file[:10]
    with pytest.raises(UsageError, match="hellaswag_train.jsonl"):
        hellaswag.load_examples("train", data=tmp_path)


def test_download_checks_val_sha256_and_caches(tmp_path, monkeypatch):
    # a file:// URL stands in for GitHub, so this runs offline
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(FIXTURE, source / "hellaswag_val.jsonl")
    shutil.copy(FIXTURE, source / "hellaswag_train.jsonl")
    monkeypatch.setattr(hellaswag, "DATA_URL", f"file://{source}/hellaswag_{{split}}.jsonl")
    monkeypatch.setattr(hellaswag, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(UsageError, match="sha256"):  # the fixture is not the full val file
        hellaswag.load_examples("val")
    assert not (tmp_path / "cache" / "hellaswag_val.jsonl").exists()
    assert len(hellaswag.load_examples("train")) == 100  # train's hash is not pinned
    assert os.listdir(tmp_path / "cache") == ["hellaswag_train.jsonl"]  # no temp files left behind


# -----------------------------------------------------------------------------
# bad input: one line on stderr, starting "error:", and a non-zero exit


def assert_one_line_error(out, *fragments):
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_model_is_a_one_line_error(tmp_path):
    not_gpt2 = tmp_path / "not_gpt2"
    not_gpt2.mkdir()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for name, fragment in (("no-such-model", "unknown model"), (str(not_gpt2), "not a GPT-2"), (str(junk), "corrupt")):
        assert_one_line_error(run_cli("-m", name, "--data", str(FIXTURE), "-d", "cpu"), fragment)
    # and once through a real process: its stderr is that one line and nothing else
    assert_one_line_error(run_cli("-m", "no-such-model", "--data", str(FIXTURE), "-d", "cpu", cwd=ROOT), "unknown")


def test_offline_without_data_says_which_data_to_pass(tmp_path):
    # a copy of the scripts with an empty cache beside it, and a proxy that refuses every connection
    for path in [*ROOT.glob("*.py"), ROOT / "gpt2.tiktoken"]:
        shutil.copy(path, tmp_path / path.name)
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    env["https_proxy"] = "http://127.0.0.1:9"
    assert_one_line_error(run_cli("-d", "cpu", cwd=tmp_path, env=env), "--data", "hellaswag_val.jsonl")
    assert_one_line_error(run_cli("--data", str(tmp_path / "missing.jsonl")), "missing.jsonl")


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "not valid JSON"),
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}', "label"),
    ('{"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}', "4 strings"),
])
def test_bad_jsonl_line_is_a_one_line_error_naming_file_and_line(tmp_path, line, fragment):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(FIXTURE.read_text().splitlines(keepends=True)[:2]) + line + "\n")
    assert_one_line_error(run_cli("--data", str(data), "-d", "cpu"), f"{data}:3:", fragment)


def test_short_context_model_cuts_each_row_on_its_own_and_scores_every_ending_token(hf_folder, model, examples):
    # the same weights with a 48-token context: examples that fit score exactly as before; in a longer one each
    # ending keeps all its tokens and as much of the context before it as fits, as the HF model scores that row
    short = GPT(dataclasses.replace(model.config, block_size=48))
    sd = model.state_dict()
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:48]
    short.load_state_dict(sd)
    fits = [ex for ex in examples if hellaswag.render_example(ex)[0].size(1) <= 48]
    assert 0 < len(fits) < len(examples)
    assert hellaswag.evaluate(short, fits, "cpu") == hellaswag.evaluate(model, fits, "cpu")
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    enc = get_tokenizer()
    cut = [ex for ex in examples if hellaswag.render_example(ex)[0].size(1) > 48][:5]
    expected = 0
    for ex in cut:
        tokens, mask, label = hellaswag.render_example(ex, block_size=48)
        sums, means = hellaswag.ending_losses(short, tokens, mask)
        ref = []
        for ending in ex["endings"]:
            end = enc.encode(" " + ending)
            row = (enc.encode(ex["ctx"]) + end)[-48:]
            with torch.no_grad():
                logprobs = F.log_softmax(hf(torch.tensor([row])).logits[0].double(), dim=-1)
            ref.append(-sum(logprobs[len(row) - len(end) + k - 1, tok].item() for k, tok in enumerate(end)))
        torch.testing.assert_close(sums.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4, rtol=1e-5)
        assert mask.sum(dim=1).tolist() == [len(enc.encode(" " + e)) for e in ex["endings"]]
        expected += int(means.argmin().item() == label)
    n, _, n_norm = hellaswag.evaluate(short, cut, "cpu", batch_size=2)
    assert (n, n_norm) == (5, expected)


def test_examples_a_short_context_cannot_score_are_left_out_in_one_line(tmp_path, examples, hf_folder):
    long_ending = dict(examples[0], endings=["word " * 60] + examples[0]["endings"][1:])
    kept, note = hellaswag.fit_to_block([examples[1], long_ending, examples[2]], 48)
    assert kept == [examples[1], examples[2]] and note.startswith("1 of 3 HellaSwag examples left out")
    assert hellaswag.fit_to_block(examples[:3], 48) == (examples[:3], None)
    with pytest.raises(UsageError, match="too long for block_size 48"):
        hellaswag.render_example(long_ending, block_size=48)
    # the script says so and scores the rest: the fixture has endings longer than a 32-token context
    short = GPT(dataclasses.replace(load_model(str(hf_folder)).config, block_size=32))
    torch.save({"model": short.state_dict(), "config": dataclasses.asdict(short.config)}, tmp_path / "short.pt")
    r = run_cli("-m", str(tmp_path / "short.pt"), "--data", str(FIXTURE), "-d", "cpu")
    assert r.returncode == 0, r.stderr
    left_out = int(r.stdout.split(" of 100 HellaSwag examples left out")[0].split()[-1])
    assert 0 < left_out < 100 and json.loads(r.stdout.splitlines()[-1])["examples"] == 100 - left_out


# -----------------------------------------------------------------------------
# precision


def test_the_standalone_score_on_a_gpu_is_float32_as_openais_0_2955_was_scored(hf_folder, monkeypatch):
    # on a faked H100 (where --dtype auto takes bf16), hellaswag.py must score as the CPU does in float32: the
    # model and the scoring are run on the CPU here, with what the script chose for the GPU
    cpu = run_cli("-m", hf_folder, "--data", FIXTURE, "-d", "cpu")
    assert cpu.returncode == 0 and "float32 (--dtype float32)" in cpu.stdout, cpu.stderr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    matmul = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", matmul.append)
    chosen = []
    real_evaluate = hellaswag.evaluate

    def evaluate(model, examples, device, batch_size, autocast_dtype=None, progress=False):
        chosen.append((device, autocast_dtype))
        return real_evaluate(model, examples, "cpu", batch_size, autocast_dtype=autocast_dtype)

    monkeypatch.setattr(hellaswag, "load_model", lambda source, device: load_model(source, "cpu"))
    monkeypatch.setattr(hellaswag, "evaluate", evaluate)
    gpu = run_cli("-m", hf_folder, "--data", FIXTURE)
    assert gpu.returncode == 0, gpu.stderr
    assert chosen == [(torch.device("cuda", 0), None)] and matmul == ["high"]  # no autocast; TF32 matmuls
    assert gpu.stdout.splitlines()[-1] == cpu.stdout.splitlines()[-1]  # the same counts
    assert "on cuda:0, float32 (--dtype float32)" in gpu.stdout
    chosen.clear()
    assert run_cli("-m", hf_folder, "--data", FIXTURE, "--dtype", "bfloat16").returncode == 0  # faster, if asked
    assert chosen == [(torch.device("cuda", 0), torch.bfloat16)]
