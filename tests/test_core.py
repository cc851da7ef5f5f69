"""
core.py scores CORE as nanochat does: its templates, few-shot draws, spans, crops and scoring checked by hand,
against a plain one-row-at-a-time reference, over 2 ranks, and against nanochat's own core_eval.py where its
source is at hand; and --core in --eval_only and at a training run's last step.
"""
import csv
import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import core
from conftest import ROOT, launch, run_main
from train_gpt2 import EOT, GPT, GPT2_VOCAB, GPTConfig, UsageError, get_tokenizer

# nanochat's git directory (a `fetch` mirror here; NANOCHAT_GIT_DIR for a clone's .git) and the commit whose
# core_eval.py core.py follows: the oracle tests skip without it
NANOCHAT_GIT_DIR = Path(os.environ.get("NANOCHAT_GIT_DIR", "/work/.mirror/karpathy+nanochat/repo"))
NANOCHAT_COMMIT = "21a7774"
BLOCK_SIZE = 64  # the test model's context: the long tasks' prompts are several times longer

WORDS = ("apple river stone cloud green quiet market winter candle silver garden bridge yellow engine "
         "lantern forest copper basket thunder orchard meadow harbor pepper violet marble saddle").split()
NAMES = ("Anna Ben Carla David Elena Frank Greta Hugo Ines Jonas").split()


def phrase(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def mc_rows(rng, n, query_words=4, choices=4):
    rows = []
    for i in range(n):
        options = [phrase(rng, rng.randint(1, 3)) for _ in range(choices)]
        if i % 3 == 0:  # choices that share their first words: scored from where they first differ
            options = ["the old " + o for o in options]
        rows.append({"query": f"Question {i}: {phrase(rng, query_words)}?", "choices": options,
                     "gold": rng.randrange(choices)})
    return rows


def schema_rows(rng, n):
    rows = []
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        thing = phrase(rng, 2)
        rows.append({"context_options": [f"{a} lent {b} the {thing} because {x}" for x in (a, b)],
                     "continuation": f"had {phrase(rng, rng.randint(1, 3))} to spare.",
                     "gold": rng.randrange(2)})
    return rows


def lm_rows(rng, n, context_words=6, last="and then the"):
    rows = []
    for i in range(n):
        # trailing and leading spaces: nanochat trims every context
        pad = "  " if i % 2 else ""
        rows.append({"context": f"{pad}{rng.choice(NAMES)} saw {phrase(rng, context_words)} {last}{pad}",
                     "continuation": phrase(rng, rng.randint(1, 2))})
    return rows


def arithmetic_rows(rng, n):  # numbers, not strings, as some of the bundle's rows have them
    return [{"context": f"{a} plus {b} is", "continuation": a + b}
            for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(n))]


# label: (kind, shots, continuation_delimiter or None for nanochat's default " ", rows, random baseline %)
def toy_tasks():
    rng = random.Random(0)
    return {
        "toy_mc": ("multiple_choice", 0, None, mc_rows(rng, 12), 25),
        "toy_mc_fewshot": ("multiple_choice", 3, "\nAnswer: ", mc_rows(rng, 12), 25),
        "toy_schema": ("schema", 0, None, schema_rows(rng, 10), 50),
        "toy_schema_fewshot": ("schema", 2, None, schema_rows(rng, 10), 50),
        "toy_lm": ("language_modeling", 0, None, lm_rows(rng, 12), 0),
        "toy_lm_fewshot": ("language_modeling", 3, "\nA: ", lm_rows(rng, 12), 0),
        "toy_arithmetic": ("language_modeling", 2, None, arithmetic_rows(rng, 8), 0),
        # prompts of 100-300 tokens, longer than the test model's 64
        "toy_long_mc": ("multiple_choice", 4, None, mc_rows(rng, 10, query_words=25, choices=3), 33.3),
        "toy_long_lm": ("language_modeling", 5, None,
                        lm_rows(rng, 10, context_words=30, last="and at last a"), 0),
    }


def make_bundle(folder, tasks=None):
    """An eval bundle in nanochat's layout: core.yaml, eval_meta_data.csv and eval_data/."""
    import yaml
    tasks = toy_tasks() if tasks is None else tasks
    (folder / "eval_data" / "toy").mkdir(parents=True)
    entries = []
    for label, (kind, shots, delimiter, rows, _) in tasks.items():
        entry = {"label": label, "dataset_uri": f"toy/{label}.jsonl", "num_fewshot": [shots],
                 "icl_task_type": kind}
        if delimiter is not None:
            entry["continuation_delimiter"] = delimiter
        entries.append(entry)
        with open(folder / "eval_data" / "toy" / f"{label}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    (folder / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    with open(folder / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                    "Centered Metric?", "Description"])
        for label, (kind, shots, _, rows, baseline) in tasks.items():
            w.writerow([label, "toy", kind, shots, len(rows), baseline, "", "a test task"])
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def tasks(bundle):
    return core.load_bundle(bundle)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=BLOCK_SIZE, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


class Boosted(torch.nn.Module):
    """The tiny GPT with a bigram table's next token lifted far above the rest, so that some continuations
    are predicted exactly. Unknown tokens point at a padded vocab entry, which scoring never reads."""

    def __init__(self, gpt, successor):
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        self.register_buffer("successor", successor)

    def forward(self, idx):
        logits, _ = self.gpt(idx)
        boost = torch.full_like(logits[..., :1], 30.0)
        return logits.scatter_add(2, self.successor[idx].unsqueeze(2), boost), None


def sequences(task, idx):
    """Row idx's (tokens, start, end) before any crop, tokenized one prompt at a time."""
    enc = get_tokenizer()
    return core.spans(task, idx, [[EOT] + enc.encode_ordinary(p) for p in core.render(task, idx)])


@pytest.fixture(scope="module")
def model(tasks):
    """Greedy-exact on the continuations of the first half of each language modeling task's rows (where
    their bigrams do not clash: each task's continuations follow a token of its own), and the tiny GPT's own
    guess elsewhere."""
    successor = torch.full((50304,), 50300, dtype=torch.long)
    for task in tasks:
        if task.kind == "language_modeling":
            for idx in range(len(task.rows) // 2):
                for tokens, start, end in sequences(task, idx):
                    tokens, start, end = core.crop(tokens, start, end, BLOCK_SIZE)
                    for p in range(start, end):
                        successor[tokens[p - 1]] = tokens[p]
    return Boosted(tiny_gpt(), successor).eval()


def reference_right(model, task, idx):
    """Row idx scored the plain way: one sequence per forward, a Python loop over its scored tokens."""
    means, exact = [], []
    with torch.no_grad():
        for tokens, start, end in sequences(task, idx):
            cut = max(0, len(tokens) - BLOCK_SIZE)
            tokens, start, end = tokens[cut:], max(start - cut, 1), end - cut
            logits = model(torch.tensor([tokens]))[0][0, :, :GPT2_VOCAB].double()
            losses = [F.cross_entropy(logits[p - 1], torch.tensor(tokens[p])).item()
                      for p in range(start, end)]
            means.append(sum(losses) / len(losses))
            exact.append(all(logits[p - 1].argmax().item() == tokens[p] for p in range(start, end)))
    if task.kind == "language_modeling":
        return exact[0]
    return means.index(min(means)) == task.rows[idx]["gold"]


@pytest.fixture(scope="module")
def expected(model, tasks):
    return {task.label: [reference_right(model, task, idx) for idx in range(len(task.rows))]
            for task in tasks}


# -----------------------------------------------------------------------------
# nanochat's rules, each on its own


def toy_task(kind, rows, shots=0, delimiter=" "):
    return core.Task("t", kind, shots, delimiter, 25.0, rows)


def test_templates_hand_checked():
    mc = toy_task("multiple_choice", [{"query": "Q0", "choices": ["a", "b"], "gold": 1},
                                      {"query": "Q1", "choices": ["c", "d"], "gold": 0},
                                      {"query": "Q2", "choices": ["e", "f"], "gold": 0}], shots=2,
                  delimiter="\nAnswer: ")
    first, second = core.fewshot_indices(3, 0, 2)
    shown = {1: "Q1\nAnswer: c\n\n", 2: "Q2\nAnswer: e\n\n"}
    assert core.render(mc, 0) == [shown[first] + shown[second] + "Q0\nAnswer: a",
                                  shown[first] + shown[second] + "Q0\nAnswer: b"]
    schema = toy_task("schema", [{"context_options": ["A did", "B did"], "continuation": "it.", "gold": 1}])
    assert core.render(schema, 0) == ["A did it.", "B did it."]
    lm = toy_task("language_modeling", [{"context": "  The cat sat on the ", "continuation": "mat"},
                                        {"context": "One two ", "continuation": "three"}], shots=1)
    # contexts trimmed; the prompt without its continuation stripped of the delimiter's space
    assert core.render(lm, 0) == ["One two three\n\nThe cat sat on the",
                                  "One two three\n\nThe cat sat on the mat"]
    numbers = toy_task("language_modeling", [{"context": 12, "continuation": 3.5}])
    assert core.render(numbers, 0) == ["12", "12 3.5"]


@pytest.mark.parametrize("n", [2, 5, 40, 86, 87, 300, 20321])
def test_fewshot_draw_is_nanochats_sample_of_the_other_rows(n):
    for idx in {0, 1, n // 2, n - 1}:
        for shots in {1, 3, 10}:
            if shots < n:
                others = [i for i in range(n) if i != idx]
                assert core.fewshot_indices(n, idx, shots) == random.Random(1234 + idx).sample(others, shots)


def test_spans_multiple_choice_from_the_first_differing_token_schema_over_the_shared_ending():
    enc = get_tokenizer().encode_ordinary
    mc = toy_task("multiple_choice", [{"query": "Pick", "choices": ["the old red car", "the old blue car"],
                                       "gold": 0}])
    tokens = [[EOT] + enc(p) for p in core.render(mc, 0)]
    shared = 1 + len(enc("Pick the old"))  # the choices' shared words are not scored
    assert [(s, e) for _, s, e in core.spans(mc, 0, tokens)] == [(shared, len(t)) for t in tokens]
    schema = toy_task("schema", [{"context_options": ["Ann left", "Bob, who stayed, left"],
                                  "continuation": "at noon.", "gold": 0}])
    tokens = [[EOT] + enc(p) for p in core.render(schema, 0)]
    shared = len(enc(" left at noon."))  # the contexts' shared last word is scored with the continuation
    assert [(s, e) for _, s, e in core.spans(schema, 0, tokens)] == [(len(t) - shared, len(t))
                                                                    for t in tokens]
    lm = toy_task("language_modeling", [{"context": "One two", "continuation": "three"}])
    tokens = [[EOT] + enc(p) for p in core.render(lm, 0)]
    assert core.spans(lm, 0, tokens) == [(tokens[1], len(tokens[0]), len(tokens[1]))]


def test_a_prompt_whose_tokens_a_continuation_changes_is_refused():
    enc = get_tokenizer().encode_ordinary
    merged = toy_task("language_modeling", [{"context": "hel", "continuation": "lo"}], delimiter="")
    empty = toy_task("language_modeling", [{"context": "x", "continuation": ""}], delimiter="")
    for lm in merged, empty:  # "hello" is one token; an empty continuation has none to score
        with pytest.raises(UsageError, match="does not tokenize as a start"):
            core.spans(lm, 0, [[EOT] + enc(p) for p in core.render(lm, 0)])


def test_crop_keeps_the_last_block_size_tokens():
    tokens = list(range(100))
    assert core.crop(tokens, 90, 100, 64) == (tokens[36:], 54, 64)
    assert core.crop(tokens[:50], 40, 50, 64) == (tokens[:50], 40, 50)
    # the scored tokens fill the context: the first, with no token before it, is left out
    assert core.crop(tokens, 20, 100, 64) == (tokens[36:], 1, 64)


# -----------------------------------------------------------------------------
# the bundle


def test_load_bundle_shuffles_as_nanochat_and_keeps_the_first_rows(bundle, tasks):
    spec = toy_tasks()
    assert [t.label for t in tasks] == list(spec)
    for task in tasks:
        kind, shots, delimiter, rows, baseline = spec[task.label]
        random.Random(1337).shuffle(rows)
        assert (task.kind, task.shots, task.delimiter, task.baseline, task.rows) == \
               (kind, shots, delimiter or " ", baseline, rows)
    cut = core.load_bundle(bundle, max_per_task=6)
    assert [t.rows for t in cut] == [t.rows[:6] for t in tasks]


def test_bad_bundles_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="no core.yaml in .* pass --bundle"):
        core.load_bundle(tmp_path)
    few = make_bundle(tmp_path / "few", {"five": ("language_modeling", 10, None,
                                                  lm_rows(random.Random(0), 5), 0)})
    with pytest.raises(UsageError, match="draws 10 examples from its other 4 rows: pass --max_per_task 11"):
        core.load_bundle(few)
    odd = make_bundle(tmp_path / "odd", {"odd": ("generation", 0, None, lm_rows(random.Random(0), 5), 0)})
    with pytest.raises(UsageError, match="icl_task_type 'generation'"):
        core.load_bundle(odd)
    bad = make_bundle(tmp_path / "bad", {"bad": ("multiple_choice", 0, None,
                                                 [{"query": "q", "choices": ["a"], "gold": 3}], 25)})
    with pytest.raises(UsageError, match=r"bad.jsonl:1: 'gold' must be an index into its 1 options"):
        core.load_bundle(bad)
    (bad / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nother,25\n")
    with pytest.raises(UsageError, match="no random baseline below 100 for task bad"):
        core.load_bundle(bad)
    with pytest.raises(UsageError, match="--max_per_task must be >= 0"):
        core.load_bundle(bundle, max_per_task=-1)


def zip_bundle(folder, path, top="eval_bundle"):
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            z.write(f, f"{top}/{f.relative_to(folder)}")
    return path


def test_download_unpacks_once_and_atomically(bundle, tasks, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(core, "CACHE_DIR", cache / "eval_bundle")
    leftovers = lambda: sorted(p.name for p in cache.iterdir() if p.name != "eval_bundle")  # noqa: E731
    monkeypatch.setattr(core, "BUNDLE_URL", (tmp_path / "missing.zip").as_uri())
    with pytest.raises(UsageError, match="could not download and unpack .* pass --bundle"):
        core.load_bundle()
    assert leftovers() == [] and not (cache / "eval_bundle").exists()
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    monkeypatch.setattr(core, "BUNDLE_URL", (tmp_path / "broken.zip").as_uri())
    with pytest.raises(UsageError, match="could not download and unpack"):
        core.load_bundle()
    monkeypatch.setattr(core, "BUNDLE_URL", zip_bundle(bundle, tmp_path / "flat.zip", top="other").as_uri())
    with pytest.raises(UsageError, match="holds no eval_bundle/core.yaml"):
        core.load_bundle()
    assert leftovers() == [] and not (cache / "eval_bundle").exists()
    monkeypatch.setattr(core, "BUNDLE_URL", zip_bundle(bundle, tmp_path / "eval_bundle.zip").as_uri())
    assert [t.rows for t in core.load_bundle()] == [t.rows for t in tasks]
    assert leftovers() == []
    monkeypatch.setattr(core, "BUNDLE_URL", (tmp_path / "missing.zip").as_uri())
    assert [t.rows for t in core.load_bundle()] == [t.rows for t in tasks]  # from the cache


# -----------------------------------------------------------------------------
# scoring


def test_rows_scored_as_one_at_a_time_plainly(model, tasks, expected):
    for task in tasks:
        right = expected[task.label]
        with torch.no_grad():
            for batch_tokens in (150, 8192):  # a few sequences a forward, a chunk's all
                assert core.score_rows(model, task, range(len(task.rows)), torch.device("cpu"),
                                       batch_tokens) == right, (task.label, batch_tokens)
        if task.kind == "language_modeling":  # the bigram table's rows are right, the others not all
            assert any(right) and not all(right), task.label


def test_the_long_tasks_prompts_are_longer_than_the_context(tasks):
    for task in tasks:
        longest = max(len(t) for idx in range(len(task.rows)) for t, _, _ in sequences(task, idx))
        assert (longest > 2 * BLOCK_SIZE) == task.label.startswith("toy_long"), (task.label, longest)


def test_continuation_scores_ignore_padding_and_padded_vocab(model, tasks):
    task = next(t for t in tasks if t.label == "toy_long_mc")
    seqs = [core.crop(*s, BLOCK_SIZE) for idx in range(4) for s in sequences(task, idx)]
    cpu = torch.device("cpu")
    with torch.no_grad():
        together = core.continuation_scores(model, seqs, cpu)
        alone = [core.continuation_scores(model, [s], cpu)[0] for s in seqs]
    assert [hit for _, hit in together] == [hit for _, hit in alone]
    assert torch.allclose(torch.tensor([m for m, _ in together]), torch.tensor([m for m, _ in alone]),
                          atol=1e-5)


def test_ranks_share_the_rows(model, tasks):
    task = tasks[1]
    cpu = torch.device("cpu")
    with torch.no_grad():
        whole = core.score_rows(model, task, range(len(task.rows)), cpu)
        shares = [core.score_rows(model, task, range(r, len(task.rows), 3), cpu) for r in range(3)]
    assert [shares[i % 3][i // 3] for i in range(len(task.rows))] == whole


def test_core_is_the_mean_of_the_centred_accuracies(model, tasks, expected):
    model.train()
    lines = []
    result = core.evaluate(model, tasks, torch.device("cpu"), say=lines.append)
    assert model.training  # restored
    for task in tasks:
        right = expected[task.label]
        accuracy = result["results"][task.label]
        assert accuracy == pytest.approx(sum(right) / len(right), abs=1e-7)
        assert result["centered"][task.label] == pytest.approx((accuracy - task.baseline / 100)
                                                               / (1 - task.baseline / 100))
    assert result["core"] == pytest.approx(sum(result["centered"].values()) / len(tasks))
    assert [line.split()[0] for line in lines] == [t.label for t in tasks]
    assert "toy_mc_fewshot" in lines[1] and " 3-shot multiple_choice" in lines[1] and "centered" in lines[1]


def test_load_for_run_skips_with_a_line(bundle, tmp_path, capsys):
    assert [t.label for t in core.load_for_run(bundle, 6, True, False)] == list(toy_tasks())
    assert core.load_for_run(tmp_path, None, True, False) is None
    assert capsys.readouterr().out.startswith("CORE skipped: no core.yaml in")


# -----------------------------------------------------------------------------
# command line


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    """A log dir with two checkpoints of the tiny GPT: -m picks the newest."""
    folder = tmp_path_factory.mktemp("log")
    for step, seed in ((5, 1), (10, 0)):
        gpt = tiny_gpt(seed)
        torch.save({"model": gpt.state_dict(), "config": dataclasses.asdict(gpt.config)},
                   folder / f"model_{step:05d}.pt")
    return folder


def test_cli_prints_a_line_per_task_core_openai_and_json(bundle, log_dir, tasks):
    r = run_main(core.main, ["-m", log_dir, "--bundle", bundle, "-d", "cpu"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rows = sum(len(t.rows) for t in tasks)
    assert lines[0].startswith(f"{log_dir / 'model_00010.pt'}: ") and f"{len(tasks)} tasks, {rows} rows" \
        in lines[0]
    n = len(tasks)
    assert [line.split()[0] for line in lines[1:n + 1]] == [t.label for t in tasks]
    assert "CORE" in lines[n + 1]
    assert lines[n + 2].startswith("OpenAI's GPT-2 as nanochat measured it: 124M 0.1139 | 350M 0.1849")
    result = json.loads(lines[-1])
    with torch.no_grad():
        expected = core.evaluate(tiny_gpt(0), tasks, torch.device("cpu"))
    assert result == expected
    assert f"CORE {result['core']:.4f} in" in lines[n + 1]


def test_cli_errors_are_one_line(tmp_path, bundle):
    r = run_main(core.main, ["-m", "gpt2", "--bundle", tmp_path, "-d", "cpu"])
    assert r.returncode == 1 and r.stderr.strip().startswith("error: no core.yaml in")
    r = run_main(core.main, ["-m", tmp_path, "--bundle", bundle, "-d", "cpu"])
    assert r.returncode == 1 and "holds neither a transformers model" in r.stderr


def test_two_ranks_score_what_one_process_does(bundle, log_dir, tmp_path):
    # 9 rows a task: the ranks score 5 and 4, in batches of their own
    args = ["-m", log_dir, "--bundle", bundle, "-d", "cpu", "--batch_tokens", "300", "--max_per_task", "9"]
    one = run_main(core.main, args)
    two = launch(args, cwd=tmp_path, ranks=2, script=ROOT / "core.py")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert json.loads(two.stdout.splitlines()[-1]) == json.loads(one.stdout.splitlines()[-1])
    assert "2 process(es) on cpu" in two.stdout and two.stdout.count("CORE") == 1  # rank 0 alone prints


# -----------------------------------------------------------------------------
# against nanochat's own core_eval.py


@pytest.fixture(scope="module")
def nanochat(tmp_path_factory):
    """nanochat/core_eval.py at NANOCHAT_COMMIT, imported from a copy (plain Python: jinja2 and torch)."""
    pytest.importorskip("jinja2")
    if not NANOCHAT_GIT_DIR.is_dir():
        pytest.skip(f"no nanochat git dir at {NANOCHAT_GIT_DIR} (set NANOCHAT_GIT_DIR to a clone's .git)")
    r = subprocess.run(["git", "--git-dir", str(NANOCHAT_GIT_DIR), "show",
                        f"{NANOCHAT_COMMIT}:nanochat/core_eval.py"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"nanochat's core_eval.py at {NANOCHAT_COMMIT} not readable: {r.stderr.strip()}")
    path = tmp_path_factory.mktemp("nanochat") / "nanochat_core_eval.py"
    path.write_text(r.stdout)
    spec = importlib.util.spec_from_file_location("nanochat_core_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Tokenizer:
    """nanochat's tokenizer interface over ours: GPT-2's BPE, <|endoftext|> its BOS."""

    def get_bos_token_id(self):
        return EOT

    def __call__(self, prompts, prepend):
        return [[prepend] + get_tokenizer().encode_ordinary(p) for p in prompts]


class Wrapped:
    """nanochat's model interface over ours (as its ModelWrapper for GPT-2): logits, and the context to crop
    to."""

    def __init__(self, model):
        self.model, self.max_seq_len = model, model.config.block_size

    def __call__(self, input_ids):
        return self.model(input_ids)[0][..., :GPT2_VOCAB]


def test_prompts_and_spans_equal_nanochats(nanochat, tasks):
    render = {"multiple_choice": nanochat.render_prompts_mc, "schema": nanochat.render_prompts_schema,
              "language_modeling": nanochat.render_prompts_lm}
    batch = {"multiple_choice": nanochat.batch_sequences_mc, "schema": nanochat.batch_sequences_schema,
             "language_modeling": nanochat.batch_sequences_lm}
    for task in tasks:
        for idx in range(len(task.rows)):
            shown = [task.rows[i] for i in core.fewshot_indices(len(task.rows), idx, task.shots)]
            prompts = render[task.kind](task.rows[idx], task.delimiter, shown)
            assert core.render(task, idx) == prompts, (task.label, idx)
            tokens, starts, ends = batch[task.kind](Tokenizer(), prompts)
            assert sequences(task, idx) == list(zip(tokens, starts, ends)), (task.label, idx)


def test_rows_accuracies_and_core_equal_nanochats(nanochat, model, tasks, monkeypatch):
    rows = []  # each row's verdict, as nanochat's evaluate_task gets it
    example = nanochat.evaluate_example
    monkeypatch.setattr(nanochat, "evaluate_example", lambda *a: rows.append(example(*a)) or rows[-1])
    cpu = torch.device("cpu")
    with torch.no_grad():
        ours = core.evaluate(model, tasks, cpu)
        centred = {}
        for task in tasks:
            rows.clear()
            meta = {"task_type": task.kind, "num_fewshot": task.shots,
                    "continuation_delimiter": task.delimiter}
            accuracy = nanochat.evaluate_task(Wrapped(model), Tokenizer(), task.rows, cpu, meta)
            assert core.score_rows(model, task, range(len(task.rows)), cpu) == rows, task.label
            assert ours["results"][task.label] == accuracy, task.label
            centred[task.label] = (accuracy - 0.01 * task.baseline) / (1.0 - 0.01 * task.baseline)
    assert ours["centered"] == centred and ours["core"] == sum(centred.values()) / len(centred)


# -----------------------------------------------------------------------------
# --core in train_gpt2.py: --eval_only and a run's last step


def test_eval_only_core_gives_what_core_py_gives(bundle, log_dir):
    from train_gpt2 import main
    args = ["--eval_only", "--core", "--core_bundle", bundle, "--no-hellaswag", "--device", "cpu",
            "--data", ROOT / "input.txt", "--seq_len", "32", "--val_tokens", "256", "--batch_size", "4"]
    r = run_main(main, args + ["--init_from", log_dir / "model_00010.pt"])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    want = json.loads(run_main(core.main, ["-m", log_dir, "--bundle", bundle, "-d", "cpu"]).stdout.splitlines()[-1])
    assert (got["core"], got["core_results"], got["core_centered"]) == (want["core"], want["results"],
                                                                         want["centered"])


def test_a_run_with_core_scores_it_at_its_last_step(bundle, tmp_path):
    from test_train import TINY, main_1_thread, read_log
    from train_gpt2 import load_model
    log = tmp_path / "run"
    main_1_thread(TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "3", "--checkpoint_interval", "1",
                          "--core", "--core_bundle", str(bundle), "--log_dir", str(log)])
    logged = read_log(log / "log.txt", "core")
    assert list(logged) == [2]  # the last step's eval only
    # that eval runs before the last step's update: on the weights of the checkpoint of 2 steps
    with torch.no_grad():
        expected = core.evaluate(load_model(str(log / "model_000002.pt")), core.load_bundle(bundle),
                                 torch.device("cpu"))["core"]
    assert logged[2] == float(f"{expected:.4f}")
