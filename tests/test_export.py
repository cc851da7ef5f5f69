"""
--export writes a folder that transformers, pipeline() and lm-eval-harness take as they take OpenAI's gpt2:
its tokenizer gives tiktoken's ids, its greedy generation is our --sample's, and its card says what the log says.
"""
import importlib.util
import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, GenerationConfig, pipeline

import hellaswag
import hf_export
import train_gpt2
from conftest import ROOT
from hf_export import EXPORT_TAG, export_hf, is_export
from test_train import TINY
from train_gpt2 import EOT, GPT2_VOCAB, UsageError, get_tokenizer, load_model, main

FIXTURE = ROOT / "tests" / "fixtures" / "hellaswag_val_100.jsonl"
FIXTURE_33 = ROOT / "tests" / "fixtures" / "hellaswag_val_33.jsonl"  # its first 33


def read_log(path, stream):
    return {int(step): value for step, s, value in map(str.split, open(path)) if s == stream}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained 3 steps on input.txt, a checkpoint and val + HellaSwag in log.txt after every step."""
    log = tmp_path_factory.mktemp("run") / "log"
    main(TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "3", "--log_dir", str(log), "--eval_interval", "1",
                 "--checkpoint_interval", "1", "--hellaswag", "--hellaswag_data", str(FIXTURE_33)])
    return log


@pytest.fixture(scope="module")
def export(run):
    folder = run.parent / "hf"
    main(["--init_from", str(run / "model_000003.pt"), "--export", str(folder)])
    return folder


# the keys of OpenAI's gpt2 ... gpt2-xl config.json files on the Hub but task_specific_params (pipeline's sampling
# defaults, which the export's generation_config.json sets instead)
OPENAI_CONFIG_KEYS = {"activation_function", "architectures", "attn_pdrop", "bos_token_id", "embd_pdrop",
                      "eos_token_id", "initializer_range", "layer_norm_epsilon", "model_type", "n_ctx", "n_embd",
                      "n_head", "n_layer", "n_positions", "resid_pdrop", "summary_activation",
                      "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj",
                      "vocab_size"}


def test_exported_config_carries_openais_keys_for_llama_cpps_converter(export):
    # llama.cpp's convert_hf_to_gguf.py reads n_ctx, n_embd, n_head, n_layer and layer_norm_epsilon for GPT-2
    config = json.loads((export / "config.json").read_text())
    assert OPENAI_CONFIG_KEYS <= set(config), OPENAI_CONFIG_KEYS - set(config)
    model = load_model(str(export.parent / "log" / "model_000003.pt"))
    assert config["n_ctx"] == config["n_positions"] == model.config.block_size
    assert (config["n_embd"], config["n_head"], config["n_layer"]) == (32, 2, 2)
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (GPT2_VOCAB, EOT, EOT)
    assert (config["activation_function"], config["layer_norm_epsilon"], config["model_type"]) == \
        ("gelu_new", 1e-5, "gpt2")
    assert config["architectures"] == ["GPT2LMHeadModel"]


def test_exported_tokenizer_matches_tiktoken_on_input_txt(export):
    text = (ROOT / "input.txt").read_text()
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok(text, verbose=False)["input_ids"]
    assert ids == get_tokenizer().encode_ordinary(text)
    assert len(ids) == 338025  # not vacuous: the whole file, as build-nanogpt counts it
    assert tok.decode(ids) == text


def test_exported_tokenizer_matches_tiktoken_on_hellaswag_texts(export):
    tok, enc = AutoTokenizer.from_pretrained(export), get_tokenizer()
    examples = [json.loads(line) for line in open(FIXTURE)]
    # the endings as hellaswag.py scores them (after a space) and as they stand
    texts = [t for ex in examples for t in [ex["ctx"], *ex["endings"], *(" " + e for e in ex["endings"])]]
    assert len(texts) == 900
    assert tok(texts)["input_ids"] == [enc.encode_ordinary(t) for t in texts]


def test_endoftext_is_one_special_token_and_the_bos_eos_unk_and_pad(export):
    tok = AutoTokenizer.from_pretrained(export)
    text = "ROMEO: hello<|endoftext|>JULIET: good night"
    ids = tok(text)["input_ids"]
    assert ids == get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(EOT) == 1 and len(ids) > 5
    assert tok.decode(ids) == text
    assert tok.bos_token_id == tok.eos_token_id == tok.unk_token_id == EOT
    assert len(tok) == GPT2_VOCAB
    gen = GenerationConfig.from_pretrained(export)
    assert gen.eos_token_id == gen.pad_token_id == EOT


def test_pipeline_greedy_generation_equals_our_sample_token_for_token(run, export, capsys):
    prompt, n = "ROMEO:", 24  # prompt + n tokens fit the tiny model's block_size of 32
    capsys.readouterr()
    main(["--init_from", str(run / "model_000003.pt"), "--sample", "--temperature", "0", "--num_samples", "1",
          "--prompt", prompt, "--max_new_tokens", str(n)])  # train_gpt2.py --sample, in this process
    ours = capsys.readouterr().out.rsplit("\n" + "-" * 40 + "\n", 1)[0]
    # eos_token_id=None: our sampler does not stop at <|endoftext|>, pipeline's default does
    out = pipeline("text-generation", model=str(export))(prompt, max_new_tokens=n, do_sample=False,
                                                          eos_token_id=None, return_tensors=True)
    ids = out[0]["generated_token_ids"]
    prompt_ids = get_tokenizer().encode(prompt)
    assert len(ids) == len(prompt_ids) + n and ids[:len(prompt_ids)] == prompt_ids
    assert get_tokenizer().decode(ids) == ours
    greedy = train_gpt2.generate(load_model(str(run / "model_000003.pt")).eval(), torch.tensor([prompt_ids]), n,
                                 temperature=0)
    assert ids == greedy[0].tolist()


def test_model_card_states_the_size_tokens_and_the_logged_val_loss_and_hellaswag(run, export):
    card = (export / "README.md").read_text()
    front, body = card.split("\n---\n", 1)
    assert front.startswith("---\n") and "library_name: transformers" in front
    assert "pipeline_tag: text-generation" in front and "license:" in front
    model = load_model(str(run / "model_000003.pt"))
    n_params = model.num_params() - (model.config.vocab_size - GPT2_VOCAB) * model.config.n_embd  # no padding rows
    assert f"{n_params:,} " in body and "2 layers, 2 heads, width 32, context 32 tokens" in body
    assert f"3 steps x 256 tokens = {3 * 256:,} tokens" in body
    # the last val and HellaSwag lines are at step 2, before the run's last update, and the card says so
    val, hella = read_log(run / "log.txt", "val"), read_log(run / "log.txt", "hella")
    assert max(val) == max(hella) == 2
    assert f"val loss | {val[2]} at step 2, 1 update(s) before this checkpoint (log.txt)" in body
    assert f"acc_norm | {hella[2]} at step 2, 1 update(s) before this checkpoint" in body
    assert f"--init_from {run / 'model_000003.pt'} --export {export}" in body


def test_model_card_metadata_parses_with_huggingface_hub(export):
    data = ModelCard.load(export / "README.md").data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "other" and data.tags == ["gpt2", "text-generation", EXPORT_TAG]
    assert is_export(export)


@pytest.mark.parametrize("card", [b"# my notes\n", b"---\ntags: [gpt2\n---\n", b"---\n- a list\n---\n",
                                  b"---\ntags: 5\n---\n", b"\xff\xfe not UTF-8", b"---\ntags: [gpt2]\n---\n"])
def test_a_card_that_is_not_an_exports_is_not_an_export(tmp_path, caplog, card):
    (tmp_path / "README.md").write_bytes(card)
    assert not is_export(tmp_path)
    assert not caplog.records  # no warning logged: --export's refusal stays one line


def test_card_of_an_earlier_checkpoint_takes_the_log_line_of_its_own_step(run, tmp_path):
    export_hf(load_model(str(run / "model_000001.pt")), tmp_path / "hf", source=str(run / "model_000001.pt"))
    body = (tmp_path / "hf" / "README.md").read_text()
    val = read_log(run / "log.txt", "val")
    assert val[1] != val[2]
    assert f"val loss | {val[1]} at step 1 (log.txt)" in body and "1 steps x 256 tokens" in body


def test_exported_folder_loads_back_for_init_from_and_hellaswag(run, export):
    ckpt, folder = load_model(str(run / "model_000003.pt")).eval(), load_model(str(export)).eval()
    idx = torch.randint(0, GPT2_VOCAB, (2, 32))
    with torch.no_grad():
        assert (ckpt(idx)[0][..., :GPT2_VOCAB] - folder(idx)[0]).abs().max().item() <= 1e-4
    examples, _ = hellaswag.fit_to_block(hellaswag.load_examples(data=FIXTURE, limit=20), 32)
    assert hellaswag.evaluate(ckpt, examples, "cpu") == hellaswag.evaluate(folder, examples, "cpu")


def test_export_refuses_a_foreign_folder_and_replaces_an_earlier_export(run, tmp_path, capsys):
    ckpt = str(run / "model_000003.pt")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["--init_from", ckpt, "--export", str(foreign)])
    assert str(e.value) == f"error: --export {foreign} exists and is not an earlier export; remove it or pick another folder"
    assert os.listdir(foreign) == ["notes.txt"]
    export_hf(load_model(ckpt), tmp_path / "hf", source=ckpt)
    (tmp_path / "hf" / "stale.txt").write_text("from an earlier export")
    export_hf(load_model(ckpt), tmp_path / "hf", source=ckpt)
    assert "stale.txt" not in os.listdir(tmp_path / "hf") and "model.safetensors" in os.listdir(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf", "mine"]  # no temp folder left beside them


def test_failed_export_leaves_no_folder(run, tmp_path, monkeypatch):
    def broken(block_size):
        raise UsageError("the tokenizer broke")
    monkeypatch.setattr(hf_export, "hf_tokenizer", broken)
    with pytest.raises(UsageError, match="broke"):
        export_hf(load_model(str(run / "model_000003.pt")), tmp_path / "hf")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-eval is not installed (pip install 'lm-eval[hf]', see the README); it is not a requirement")
def test_lm_eval_harness_on_the_local_hellaswag_task_scores_as_hellaswag_py_apart_from_acc_norm(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    # a context of 128 tokens holds every fixture example whole, so both score the same tokens
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    export_hf(model, tmp_path / "hf")
    examples = hellaswag.load_examples(data=FIXTURE)
    n, correct, correct_norm = hellaswag.evaluate(model, examples, "cpu")
    # the harness's acc_norm: the highest log-likelihood per character of the ending
    by_chars = 0
    for ex in examples:
        tokens, mask, label = hellaswag.render_example(ex)
        sum_loss, _ = hellaswag.ending_losses(model, tokens, mask)
        by_chars += (sum_loss / torch.tensor([len(e) for e in ex["endings"]])).argmin().item() == label
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the project root
    tasks = TaskManager(include_path=str(ROOT / "bench"), include_defaults=False)
    out = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'}", tasks=["hellaswag_local"],
                          task_manager=tasks, device="cpu", batch_size=16)
    metrics = out["results"]["hellaswag_local"]
    assert n == 100 and metrics["acc,none"] == pytest.approx(correct / n)
    assert metrics["acc_norm,none"] == pytest.approx(by_chars / n)
