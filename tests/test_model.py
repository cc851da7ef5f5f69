import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import ROOT, launch
from hf_export import export_hf
from train_gpt2 import EOT, GPT, GPT2_VOCAB, GPTConfig, UsageError, generate, get_tokenizer, load_model


def save_random_hf(folder, **shape):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    hf.save_pretrained(folder)
    return hf


def assert_matches_hf(model, hf, B, T):
    idx = torch.randint(0, GPT2_VOCAB, (B, T))
    with torch.no_grad():
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        out = hf(idx, labels=idx)  # HF shifts the labels itself
    assert (logits - out.logits[:, :-1]).abs().max().item() <= 1e-4
    assert abs(loss.item() - out.loss.item()) <= 1e-4


@pytest.mark.parametrize("shape,B,T", [
    (dict(n_layer=2, n_head=4, n_embd=64, n_positions=128), 3, 128),
    (dict(), 1, 64),  # the full 124M shape
])
def test_matches_hf_gpt2_logits(tmp_path, shape, B, T):
    hf = save_random_hf(tmp_path, **shape)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.vocab_size == GPT2_VOCAB
    assert_matches_hf(model, hf, B, T)


def test_export_round_trip_gives_identical_hf_logits(tmp_path):
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    export_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, GPT2_VOCAB, (2, 64))
    with torch.no_grad():
        ours = model(idx)[0][..., :GPT2_VOCAB]
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_sdpa_attention_equals_explicit_masked_softmax():
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=100, n_layer=1, n_head=4, n_embd=32)
    attn = GPT(config).transformer.h[0].attn
    x = torch.randn(2, 32, 32)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(C // 4)
    att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
    y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    assert torch.allclose(attn(x), attn.c_proj(y), atol=1e-6)


def test_parameter_count_is_124m():
    assert GPT(GPTConfig(vocab_size=GPT2_VOCAB)).num_params() == 124_439_808


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    scaled = 0.02 / math.sqrt(2 * 12)
    for block in model.transformer.h[:3]:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert abs(proj.weight.std().item() - scaled) < 0.1 * scaled
            assert proj.bias.abs().max().item() == 0
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.transformer.wpe.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tokenizer_ids_and_round_trip():
    enc = get_tokenizer()
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.eot_token == EOT == 50256
    assert enc.n_vocab == GPT2_VOCAB
    text = (ROOT / "input.txt").read_text()
    tokens = enc.encode_ordinary(text)
    assert len(tokens) == 338_025
    assert enc.decode(tokens) == text


def tiny_model(seed=0, block_size=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


def test_kv_cache_generation_equals_cache_free():
    model = tiny_model()
    idx = torch.tensor([[EOT, 15496, 11], [EOT, 314, 1101]])
    # 80 new tokens run past block_size 64, so the cache has to restart on a cropped window too
    out = [generate(model, idx, 80, generator=torch.Generator().manual_seed(7), use_cache=c) for c in (True, False)]
    assert torch.equal(out[0], out[1])
    greedy = [generate(model, idx, 20, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])


def test_padded_vocab_ids_are_never_sampled():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[GPT2_VOCAB:] = 100.0  # padded rows would win every draw
    idx = torch.full((4, 1), EOT)
    out = generate(model, idx, 50, generator=torch.Generator().manual_seed(0), top_k=GPT2_VOCAB + 40)
    assert out.max().item() < GPT2_VOCAB
    out = generate(model, idx, 10, temperature=0)
    assert out.max().item() < GPT2_VOCAB


def test_same_seed_gives_same_text_and_other_seed_differs():
    model = tiny_model()
    idx = torch.full((2, 1), EOT)
    a = generate(model, idx, 30, generator=torch.Generator().manual_seed(3))
    b = generate(model, idx, 30, generator=torch.Generator().manual_seed(3))
    c = generate(model, idx, 30, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_generation_input_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(UsageError, match="top_k"):
        generate(model, torch.full((1, 1), EOT), 5, top_k=0)
    with pytest.raises(UsageError, match="longer than block_size"):
        generate(model, torch.full((1, 65), EOT), 5)


def test_bad_model_names_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown model"):
        load_model("gpt3")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UsageError, match="not a GPT-2 checkpoint"):
        load_model(str(tmp_path))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="corrupt"):
        load_model(str(bad))


def test_checkpoint_sample_and_export_from_the_command_line(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": vars(model.config)}, ckpt)
    run = lambda *a: launch(a, cwd=tmp_path, timeout=120)
    r = run("--init_from", str(ckpt), "--sample", "--prompt", "Hello", "--num_samples", "2", "--max_new_tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Hello") == 2
    r = run("--init_from", str(ckpt), "--export", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, GPT2_VOCAB, (1, 16))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0][..., :GPT2_VOCAB]).abs().max().item() <= 1e-4
    r = run("--init_from", "gpt3", "--sample")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "unknown model 'gpt3'" in r.stderr


def test_offline_hub_name_is_a_clear_error_without_retries():
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache("gpt2", "config.json"), str):
        pytest.skip("gpt2 is in this machine's HF cache, so it loads offline")
    # HF_HUB_OFFLINE=1, which the error asks for: without it huggingface_hub retries the unreachable hub (~23 s
    # where DNS fails at once) and logs each retry, before this same error
    r = launch(["--init_from", "gpt2", "--sample"], cwd=ROOT, env={"HF_HUB_OFFLINE": "1"}, timeout=60)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: could not load 'gpt2'")
    assert "set HF_HUB_OFFLINE=1" in r.stderr and "Retrying" not in r.stderr + r.stdout
