"""outliers.py against oracles written here: a plain numpy z-score over the last 128 values, and llm.c's
running-sums way of computing it (llmc/outlier_detector.h), for the decisions."""
import json
import math
import re

import numpy as np
import pytest
import torch

from outliers import WINDOW, OutlierDetector, SkipOutliers
from test_train import TINY, main_1_thread

Z = 7.0


def reference_z(history):
    """z of history[-1] over the last WINDOW values, it included, population std; None until WINDOW values
    came before it."""
    if len(history) <= WINDOW:
        return None
    w = np.array(history[-WINDOW:], dtype=np.float64)
    return (w[-1] - w.mean()) / w.std()


def reference_check(losses, norms, z=Z):
    """The reason check() should give at each step: non-finite values are reasons and stay out of the
    histories, both histories take every finite value, the loss's reason comes first."""
    histories = {"loss": [], "grad norm": []}
    out = []
    for loss, norm in zip(losses, norms):
        reasons = []
        for name, v in (("loss", loss), ("grad norm", norm)):
            if not np.isfinite(v):
                reasons.append(f"{name} {float(v)} is not finite")
                continue
            histories[name].append(float(v))
            r = reference_z(histories[name])
            if r is not None and r > z:
                reasons.append(f"{name} z-score")
        out.append(reasons[0] if reasons else None)
    return out


def without_number(reason):
    return None if reason is None else re.sub(r" z-score \S+ > \S+$", " z-score", reason)


def series(seed, n=700):
    """A loss and a grad norm random walk with spikes up and down, one at step 0 that must leave the window."""
    rng = np.random.default_rng(seed)
    loss = 3.0 + np.cumsum(rng.normal(0, 0.01, n)) - np.linspace(0, 0.5, n)
    norm = np.abs(0.3 + np.cumsum(rng.normal(0, 0.005, n))) + 0.05
    for i in [0, *rng.choice(np.arange(130, n), 12, replace=False)]:
        loss[i] += rng.choice([-1, 1]) * rng.uniform(0.05, 2.0)
        norm[i] *= rng.uniform(1.5, 20.0)
    return loss, norm


def running_sums_z(values):
    """llm.c's detector, in its way: running sum and sum of squares, z = nan until the window is full."""
    buf, total, total_sq, out = [], 0.0, 0.0, []
    for v in values:
        if len(buf) == WINDOW:
            old = buf.pop(0)
            total -= old
            total_sq -= old * old
        buf.append(v)
        total += v
        total_sq += v * v
        if len(out) < WINDOW:
            out.append(math.nan)
            continue
        mean = total / WINDOW
        var = total_sq / WINDOW - mean * mean
        std = math.sqrt(var) if var >= 0 else math.nan  # C's sqrt of a negative is nan
        out.append(0.0 if std == 0 else (v - mean) / std)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_z_matches_reference(seed):
    for values in series(seed):
        d, history = OutlierDetector(), []
        for v in values:
            history.append(float(v))
            want = reference_z(history)
            got = d.update(v)
            assert (got is None) == (want is None)
            if want is not None:
                assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_decisions_match_llmc_running_sums(seed):
    for values in series(seed, n=3000):
        d = OutlierDetector()
        ours = [d.update(v) for v in values]
        theirs = running_sums_z([float(v) for v in values])
        assert [z is None for z in ours] == [math.isnan(z) for z in theirs]
        assert [z is not None and z > Z for z in ours] == [z > Z for z in theirs]
        assert any(z is not None and z > Z for z in ours)  # the series does have outliers


def test_none_until_window_values_came_before():
    # llm.c's dev/test/test_outlier_detector.c: the first 128 updates give nan, the 129th a z
    d = OutlierDetector()
    zs = [d.update(v) for v in np.random.default_rng(0).normal(size=WINDOW + 1)]
    assert zs[:WINDOW] == [None] * WINDOW
    assert isinstance(zs[WINDOW], float)


def test_constant_window_gives_zero():
    d = OutlierDetector()
    zs = [d.update(0.1) for _ in range(WINDOW + 3)]
    assert zs[WINDOW:] == [0.0, 0.0, 0.0]


def warmed(rng):
    """A SkipOutliers whose windows hold WINDOW ordinary values, and the histories for the reference."""
    s = SkipOutliers(Z)
    losses, norms = list(3.0 + rng.normal(0, 0.01, WINDOW)), list(0.3 + rng.normal(0, 0.01, WINDOW))
    assert all(s.check(loss, norm) is None for loss, norm in zip(losses, norms))
    return s, losses, norms


def test_spike_above_z_skips_and_below_does_not():
    rng = np.random.default_rng(1)
    s, losses, norms = warmed(rng)
    mean, std = np.mean(losses[1:]), np.std(losses[1:])
    low, high = mean + 6 * std, mean + 40 * std
    assert reference_z(losses + [low]) < Z < reference_z(losses + [high])
    assert s.check(low, norms[-1]) is None
    losses.append(low)
    norms.append(norms[-1])
    reason = s.check(high, norms[-1])
    assert reason == f"loss z-score {reference_z(losses + [high]):.2f} > 7"


def test_grad_norm_spike_and_both_windows_take_every_step():
    rng = np.random.default_rng(2)
    s, losses, norms = warmed(rng)
    assert s.check(losses[-1], 10.0).startswith("grad norm z-score ")
    # both spike: the loss's reason, yet the norm's window took its spike too (llm.c updates both)
    assert s.check(50.0, 100.0).startswith("loss z-score ")
    assert list(s.norm.window)[-2:] == [10.0, 100.0]
    assert list(s.loss.window)[-1] == 50.0


def test_skipped_spike_enters_the_window():
    # the same spike three steps running: the first two are skipped, yet in the window, so the third looks
    # ordinary enough to go through (a window without skipped values would skip all three)
    rng = np.random.default_rng(3)
    s, losses, norms = warmed(rng)
    got = [s.check(10.0, norms[-1]) for _ in range(3)]
    want = [reference_z(losses + [10.0] * k) for k in (1, 2, 3)]
    assert want[0] > want[1] > Z > want[2]
    assert [r is not None for r in got] == [True, True, False]
    assert got[1] == f"loss z-score {want[1]:.2f} > 7"


def test_one_sided_a_drop_is_not_skipped():
    rng = np.random.default_rng(4)
    s, losses, norms = warmed(rng)
    assert reference_z(losses + [0.0]) < -Z and reference_z(norms + [0.0]) < -Z
    assert s.check(0.0, 0.0) is None


@pytest.mark.parametrize("seed", range(3))
def test_non_finite_skipped_and_kept_out_of_the_windows(seed):
    rng = np.random.default_rng(seed)
    losses, norms = series(seed)
    for i in rng.choice(len(losses), 20, replace=False):  # some inside the first WINDOW steps
        if rng.random() < 0.5:
            losses[i] = rng.choice([np.nan, np.inf, -np.inf])
        else:
            norms[i] = rng.choice([np.nan, np.inf])
    s = SkipOutliers(Z)
    got = [without_number(s.check(loss, norm)) for loss, norm in zip(losses, norms)]
    assert got == reference_check(losses, norms)
    assert "loss nan is not finite" in got or "loss inf is not finite" in got
    assert any(r is not None and r.startswith("grad norm") and r.endswith("not finite") for r in got)
    assert np.isfinite(list(s.loss.window) + list(s.norm.window)).all()


def test_state_dict_round_trip_gives_the_same_decisions(tmp_path):
    losses, norms = series(7, n=600)
    losses[260] += 5.0  # an outlier 10 steps after the resume: only a detector that kept its windows sees it
    norms[300] = math.nan
    whole, before = SkipOutliers(Z), SkipOutliers(Z)
    want = [whole.check(loss, torch.tensor(norm)) for loss, norm in zip(losses, norms)]
    for loss, norm in zip(losses[:250], norms[:250]):
        before.check(loss, norm)
    state = before.state_dict()
    json.dumps(state)  # plain lists and floats only
    torch.save({"outliers": state}, tmp_path / "ckpt.pt")
    resumed = SkipOutliers(Z)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["outliers"])
    got = [resumed.check(loss, norm) for loss, norm in zip(losses[250:], norms[250:])]
    assert got == want[250:]
    assert want[260] is not None and sum(r is not None for r in got) >= 3
    fresh = SkipOutliers(Z)  # what llm.c does on resume: empty windows, the outlier at 260 goes through
    assert [fresh.check(a, b) for a, b in zip(losses[250:261], norms[250:261])][-1] is None


# -----------------------------------------------------------------------------
# --skip_outliers in a run: a batch of noise at step SPIKE, after a window of steps on text the model learns

SPIKE = 130  # the window is full from step 128 on


def spike_args(data, log_dir):
    return TINY + ["--data", str(data), "--no-shuffle", "--total_batch_size", "128", "--max_lr", "1e-2",
                   "--min_lr", "1e-2", "--warmup_steps", "0", "--eval_interval", "1000", "--max_steps",
                   str(SPIKE + 1), "--checkpoint_interval", str(SPIKE), "--log_dir", str(log_dir)]


def spike_run(folder, flags):
    """A tiny run on shards whose step SPIKE reads random tokens, with checkpoints before and after that step."""
    data = folder / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 1000, 64).astype(np.uint16)  # learnt in ~50 steps: a flat window after
    step_tokens = 4 * 32  # --total_batch_size
    train = np.resize(pattern, (SPIKE + 8) * step_tokens)
    train[SPIKE * step_tokens:(SPIKE + 1) * step_tokens + 1] = rng.integers(0, 50257, step_tokens + 1)
    np.save(data / "spike_train_000000.npy", train)
    np.save(data / "spike_val_000000.npy", np.resize(pattern, 4096))
    main_1_thread(spike_args(data, folder / "run") + flags)
    return folder / "run"


def same_state(a, b):
    a, b = torch.load(a), torch.load(b)
    moments = lambda ckpt: [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    return (all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            and all(torch.equal(x, y) for x, y in zip(moments(a), moments(b))))


@pytest.mark.slow
def test_a_noise_batch_is_skipped_with_the_flag_and_applied_without_it_and_resume_skips_it_too(tmp_path, capsys):
    run = spike_run(tmp_path / "flag", ["--skip_outliers", "7"])
    out = capsys.readouterr().out
    step_line = next(line for line in out.splitlines() if line.startswith(f"step {SPIKE:5d} | loss"))
    assert re.search(r"skipped: (loss|grad norm) z-score \d+\.\d+ > 7$", step_line), step_line
    assert out.count("skipped:") == 1
    assert f"{SPIKE} skipped 1\n" in (run / "log.txt").read_text()
    # the skipped step changed neither the weights nor AdamW's moments; the step count and schedule went on
    assert same_state(run / f"model_{SPIKE:06d}.pt", run / f"model_{SPIKE + 1:06d}.pt")
    assert torch.load(run / f"model_{SPIKE + 1:06d}.pt")["step"] == SPIKE + 1
    plain = spike_run(tmp_path / "plain", [])
    assert "skipped" not in capsys.readouterr().out
    assert not same_state(plain / f"model_{SPIKE:06d}.pt", plain / f"model_{SPIKE + 1:06d}.pt")
    # resumed from the checkpoint before the spike: the windows come back with it, so the spike is skipped again
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("log.txt", f"model_{SPIKE:06d}.pt"):
        (resumed / name).write_bytes((run / name).read_bytes())
    main_1_thread(spike_args(tmp_path / "flag" / "data", resumed) + ["--skip_outliers", "7", "--resume"])
    assert same_state(run / f"model_{SPIKE + 1:06d}.pt", resumed / f"model_{SPIKE + 1:06d}.pt")
    assert (resumed / "log.txt").read_text() == (run / "log.txt").read_text()


def test_a_non_finite_loss_is_skipped_under_the_flag_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    # without the flag such a step stops the run and names it (test_train.py)
    import train_gpt2
    from conftest import ROOT
    real, calls = train_gpt2.accumulate_gradients, []

    def nan_at_step_2(model, *args, **kwargs):  # step 2's loss and gradients nan, as from an overflow
        loss = real(model, *args, **kwargs)
        calls.append(loss)
        if len(calls) == 3:
            for p in model.parameters():
                p.grad.fill_(math.nan)
            return loss * math.nan
        return loss
    monkeypatch.setattr(train_gpt2, "accumulate_gradients", nan_at_step_2)
    log = tmp_path / "log"
    main_1_thread(TINY + ["--data", str(ROOT / "input.txt"), "--log_dir", str(log), "--max_steps", "4",
                          "--checkpoint_interval", "1", "--skip_outliers", "7"])
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step") and "| loss" in line]
    assert [line.endswith("skipped: loss nan is not finite") for line in steps] == [False, False, True, False]
    assert same_state(log / "model_000002.pt", log / "model_000003.pt")
    assert not same_state(log / "model_000003.pt", log / "model_000004.pt")  # the run went on
