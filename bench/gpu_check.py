"""
Every user-facing GPU path, end to end, offline, from the project's own files (input.txt made into shards by
fineweb.py, the HellaSwag fixture in tests/fixtures). Run it first whenever a GPU is at hand:

    python bench/gpu_check.py                        # one GPU: GPT-2 124M, B=64, T=1024, compile, bf16
    python bench/gpu_check.py --device cpu --tiny    # the same checks, tiny model, on a CPU (the tests run this)

The checks, each one PASS or FAIL line with its figures:
  train     python train_gpt2.py, no torchrun: 8 steps of 524,288 tokens (--tiny: 512) with val, HellaSwag,
            samples and checkpoints at steps 4 and 8
  memory    the memory plan printed before step 0 vs the measured peak (torch.cuda.max_memory_allocated): within 25%
  fp16      the same steps (2 on a CPU) with --dtype float16 (fp16 autocast, GradScaler; what --dtype auto picks
            on a T4, V100 or RTX 20xx), no HellaSwag: losses within fp16 noise of the train check's (bf16 on a GPU, fp32 on a CPU)
  resume    --resume from the step-4 checkpoint: steps 4-7 repeat the uninterrupted run's losses
  torchrun  torchrun --standalone --nproc_per_node=1 (NCCL on a GPU): the same losses as without torchrun
  preempt   the same, sent SIGTERM after step 0: it stops at a step boundary with a checkpoint, and --resume
            ends with the train check's losses
  fsdp      the same with --fsdp (FSDP2, bf16 weights on a GPU): the same losses within bf16 rounding
  medium    --preset gpt2-medium (350M; --tiny: its flags with the tiny shape), 5 steps: ms/step, tok/s, MFU, memory
  sample    --sample from the step-8 checkpoint
  export    --export to a transformers folder: GPT2LMHeadModel's logits equal ours (float32 both sides)
  hellaswag hellaswag.py -d DEVICE on the step-8 checkpoint (float32, as OpenAI's 0.2955 was scored)
  eval_only train_gpt2.py --eval_only on the step-4 checkpoint: the val loss the run logged at step 4
then the figures of the steady steps (ms/step, tok/s, MFU), the wall time to the end of step 0, and peak GPU
memory. The last line is `N passed, M failed` (`, K skipped` with --skip); the exit code is 1 if any check failed.
A GPU session of a few minutes can leave out the slow checks: --skip medium,fsdp.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from devices import resolve_device  # noqa: E402
from train_gpt2 import GPT2_VOCAB, UsageError, load_model  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hellaswag_val_100.jsonl")
STEPS = 8
CHECKS = ("train", "memory", "fp16", "resume", "torchrun", "preempt", "fsdp", "medium", "sample", "export",
          "hellaswag", "eval_only")
SIZES = {
    # GPT-2 124M with the recipe's batch: 8 micro-steps of 64 x 1024 on one GPU
    "gpt2": ["--batch_size", "64", "--seq_len", "1024", "--total_batch_size", "524288", "--val_tokens", "131072"],
    # seconds on a CPU; the val set (10 sequences) ends in a short batch, as 124M's does (97 sequences)
    "tiny": ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--batch_size", "4",
             "--seq_len", "64", "--total_batch_size", "512", "--val_tokens", "640"],
}
STEP_LINE = re.compile(r"step +(\d+) \| loss ([\d.]+) .*\| (\d+) ms \| ([\d,]+) tok/s(?: \| MFU ([\d.]+)%)?")


def run(cmd, timeout=600, sigterm_at=None):
    """Run cmd; returns (exit code, [(seconds since start, line)]) with stdout and stderr merged. sigterm_at: a
    line's beginning, at which the process is sent SIGTERM, as a spot reclaim or a time limit would."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    for line in proc.stdout:
        lines.append((time.monotonic() - t0, line.rstrip("\n")))
        if sigterm_at and line.startswith(sigterm_at):
            proc.send_signal(signal.SIGTERM)
            sigterm_at = None
    watchdog.cancel()
    return proc.wait(), lines


def read_log(path, stream):
    rows = [line.split() for line in open(path)] if os.path.exists(path) else []
    return {int(step): float(value) for step, s, value in rows if s == stream}


def max_diff(a, b):
    """Largest |a - b| over the steps both logged; inf if they logged different steps."""
    return max(abs(a[k] - b[k]) for k in a) if a and a.keys() == b.keys() else float("inf")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model with 512-token steps instead of 124M")
    parser.add_argument("--keep", default=None, help="keep the runs' folders here instead of a temp folder")
    parser.add_argument("--skip", default="", help=f"checks to leave out, comma-separated, to fit a short slot: "
                                                   f"{', '.join(CHECKS[1:])} (train is the one the others read)")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if not skip <= set(CHECKS[1:]):
        sys.exit(f"error: --skip {args.skip}: it takes checks among {', '.join(CHECKS[1:])}")
    try:
        device = resolve_device(args.device)  # a GPU this torch has no kernels for stops here, with the fix
    except UsageError as e:
        sys.exit(f"error: {e}")
    # how far two runs of the same steps may differ: on a GPU in the last digits of bf16 work (flash
    # attention's backward adds in a varying order); on a CPU by a rounding of the logged 6 decimals
    tol = 1e-3 if device.type == "cuda" else 1e-5
    work = args.keep or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    results = []
    clock = [time.time()]

    def report(name, ok, detail):
        results.append(ok)
        print(f"{'PASS' if ok else 'FAIL'} {name:9s} {detail} [{time.time() - clock[0]:.0f} s]", flush=True)
        clock[0] = time.time()

    def want(name):
        if name in skip:
            print(f"SKIP {name:9s} (--skip)", flush=True)
        return name not in skip

    def failed(name, rc, lines):
        tail = " / ".join(line for _, line in lines[-3:])
        report(name, False, f"exit code {rc}: {tail}")

    print(f"gpu_check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} ({device}), "
          f"torch {torch.__version__}, {'tiny' if args.tiny else 'GPT-2 124M'}, work folder {work}", flush=True)
    shards = os.path.join(work, "shards")
    rc, lines = run([py, "fineweb.py", "--input", "input.txt", "--output_dir", shards, "--prefix", "shakespeare",
                     "--shard_size", "100000"])
    if rc:
        failed("data", rc, lines)
        print(f"0 passed, {len(results)} failed")
        sys.exit(1)
    # --tiny: the fixture's first 20 examples, a few seconds a check on a CPU
    hellaswag_data = FIXTURE
    if args.tiny:
        hellaswag_data = os.path.join(work, "hellaswag_20.jsonl")
        with open(FIXTURE) as f, open(hellaswag_data, "w") as out:
            out.writelines(f.readlines()[:20])
    n_hellaswag = sum(1 for _ in open(hellaswag_data))
    # compiled on a GPU, as a run is; eager on a CPU, where the tests take the compiled paths on their own
    compile_flag = "--compile" if device.type == "cuda" else "--no-compile"
    train_args = ["train_gpt2.py", "--data", shards, "--device", str(device), compile_flag, "--dtype", "auto",
                  "--max_steps", str(STEPS), "--warmup_steps", "2", "--eval_interval", "4", "--sample_interval", "4",
                  "--checkpoint_interval", "4", "--hellaswag_data", hellaswag_data, "--max_new_tokens", "16",
                  *SIZES["tiny" if args.tiny else "gpt2"]]
    run_dir = os.path.join(work, "run")
    ckpt = os.path.join(run_dir, f"model_{STEPS:06d}.pt")

    # train: one process, no torchrun, the README's one-GPU command
    rc, lines = run([py, *train_args, "--log_dir", run_dir])
    text = "\n".join(line for _, line in lines)
    train = read_log(os.path.join(run_dir, "log.txt"), "train")
    steps = {int(m[1]): m for _, line in lines if (m := STEP_LINE.search(line))}
    ok = (rc == 0 and sorted(train) == list(range(STEPS)) and sorted(read_log(os.path.join(run_dir, "log.txt"), "val"))
          == [0, 4, STEPS - 1] and len(read_log(os.path.join(run_dir, "log.txt"), "hella")) == 3
          and "sample 0:" in text and os.path.exists(os.path.join(run_dir, "model_000004.pt")) and os.path.exists(ckpt))
    if ok:
        report("train", True, f"loss {train[0]:.4f} -> {train[STEPS - 1]:.4f}, val and HellaSwag at steps 0/4/7, "
                              "samples, checkpoints at 4 and 8")
    else:
        failed("train", rc, lines)
    figures = []
    if steps:
        steady = [steps[s] for s in sorted(steps) if s >= 2]  # step 0 compiles, step 1 may still warm up
        ms = statistics.median(float(m[3]) for m in steady)
        toks = statistics.median(float(m[4].replace(",", "")) for m in steady)
        mfu = f", MFU {statistics.median(float(m[5]) for m in steady):.1f}%" if steady[0][5] else ""
        figures.append(f"steady steps 2-{STEPS - 1}: median {ms:.0f} ms/step, {toks:,.0f} tok/s{mfu}")
        header = next(t for t, line in lines if "parameters |" in line)
        step0 = next(t for t, line in lines if STEP_LINE.search(line))
        figures.append(f"step 0 (compile, val, HellaSwag, step): {step0 - header:.1f} s after the model was built")
    # memory: the plan printed before step 0 against the measured peak at the end (a GPU run prints both)
    if want("memory"):
        plan = next((line for _, line in lines if line.startswith("memory plan per GPU:")), None)
        peak = re.search(r"peak GPU memory ([\d.]+) GiB \(the plan: ([\d.]+) GiB\)", text)
        if peak:
            ratio = float(peak[1]) / float(peak[2])
            report("memory", abs(ratio - 1) <= 0.25, f"measured peak {peak[1]} GiB vs the plan's {peak[2]} GiB: "
                                                     f"{ratio:.2f}x (within 25%?)")
        else:
            report("memory", plan is not None and device.type == "cpu",
                   f"{plan.split(':')[1].split('=')[0].strip() if plan else 'no plan line'} planned; no measured peak on a CPU")

    # fp16: the recipe for GPUs without bf16 tensor cores, run on this one; it differs from bf16 (or, on a CPU, fp32)
    # by the rounding of both, and no step may be skipped after the first few (the scale starts at 2**16 and halves
    # until the gradients fit)
    if want("fp16"):
        fp16_dir = os.path.join(work, "fp16")
        # a CPU has no fast fp16 matmul (3 s a tiny step): 2 steps there, one scaled update
        fp16_steps = STEPS if device.type == "cuda" else 2
        rc, lines = run([py, *train_args, "--log_dir", fp16_dir, "--dtype", "float16", "--no-hellaswag",
                         "--max_steps", str(fp16_steps)])
        fp16 = read_log(os.path.join(fp16_dir, "log.txt"), "train")
        skipped = sorted(read_log(os.path.join(fp16_dir, "log.txt"), "skipped"))
        fp16_tol = 5e-2 if device.type == "cuda" else 1e-3
        diff = max_diff(fp16, {s: loss for s, loss in train.items() if s < fp16_steps})
        if rc == 0 and diff <= fp16_tol and all(s < 4 for s in skipped):
            report("fp16", True, f"{fp16_steps} steps, GradScaler: max |loss diff| vs the train check {diff:.2g} (<= {fp16_tol}); "
                                 f"skipped steps {skipped or 'none'}")
        elif rc == 0:
            report("fp16", False, f"max |loss diff| vs the train check {diff:.2g} (tolerance {fp16_tol}); skipped steps "
                                  f"{skipped} (none allowed after step 3)")
        else:
            failed("fp16", rc, lines)

    # resume: the step-4 checkpoint alone in a new folder, as a run killed after step 4 leaves it
    if want("resume"):
        resumed_dir = os.path.join(work, "resumed")
        os.makedirs(resumed_dir, exist_ok=True)
        if os.path.exists(os.path.join(run_dir, "model_000004.pt")):
            shutil.copy(os.path.join(run_dir, "model_000004.pt"), resumed_dir)
        rc, lines = run([py, *train_args, "--log_dir", resumed_dir, "--resume"])
        resumed = read_log(os.path.join(resumed_dir, "log.txt"), "train")
        diff = max_diff(resumed, {k: v for k, v in train.items() if k >= 4})
        if rc == 0 and diff <= tol:
            report("resume", True, f"steps 4-{STEPS - 1} resumed from model_000004.pt: max |loss diff| {diff:.2g} (<= {tol})")
        elif rc == 0:
            report("resume", False, f"resumed losses {resumed} differ from the run's by {diff:.2g} > {tol}")
        else:
            failed("resume", rc, lines)

    # torchrun, one process: the process group (NCCL on a GPU) must not change a single step
    if want("torchrun"):
        tr_dir = os.path.join(work, "torchrun")
        rc, lines = run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *train_args,
                         "--log_dir", tr_dir])
        tr_log = os.path.join(tr_dir, "log.txt")
        diff = max(max_diff(read_log(tr_log, s), read_log(os.path.join(run_dir, "log.txt"), s)) for s in ("train", "val"))
        hella = read_log(tr_log, "hella") == read_log(os.path.join(run_dir, "log.txt"), "hella")
        if rc == 0 and diff <= tol and (hella or tol):
            report("torchrun", True, f"{STEPS} steps: max |train or val loss diff| vs no torchrun {diff:.2g} (<= {tol})"
                                     f"; HellaSwag {'identical' if hella else 'differs in the last digits'}")
        elif rc == 0:
            report("torchrun", False, f"losses differ from the single-process run's by {diff:.2g} > {tol}")
        else:
            failed("torchrun", rc, lines)

    # preempt: torchrun sent SIGTERM passes it on; the rank ends the step in flight (and perhaps the next: the
    # flag rides the step's all-reduce) and writes a checkpoint, from which --resume runs to the end
    if want("preempt"):
        pre_dir = os.path.join(work, "preempt")
        torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *train_args,
                    "--log_dir", pre_dir]
        # after step 0, in the loop: the steps left leave time for the signal to arrive, whatever the load; one
        # that comes during an eval stops it between batches
        rc, lines = run(torchrun + ["--checkpoint_interval", "1000"], sigterm_at="step     0 | loss")
        stopped = re.compile(r"SIGTERM: stopped (after step \d+|in step \d+'s eval), checkpoint \S*(model_\d+\.pt);")
        stop = next((m for _, line in lines if (m := stopped.search(line))), None)
        ckpts = sorted(f for f in os.listdir(pre_dir) if f.endswith(".pt")) if os.path.isdir(pre_dir) else []
        if rc != 0 and stop and ckpts == [stop[2]]:
            rc, lines = run(torchrun + ["--resume"])
            diff = max_diff(read_log(os.path.join(pre_dir, "log.txt"), "train"), train)
            if rc == 0 and diff <= tol:
                report("preempt", True, f"SIGTERM after step 0: stopped {stop[1]} with {ckpts[0]}; "
                                        f"--resume to step {STEPS - 1}: max |loss diff| vs the train check {diff:.2g}")
            elif rc == 0:
                report("preempt", False, f"resumed losses differ from the train check's by {diff:.2g} > {tol}")
            else:
                failed("preempt", rc, lines)
        else:
            report("preempt", False, f"exit code {rc}, stop line {stop[0] if stop else None}, checkpoints {ckpts}")

    # torchrun --fsdp, one process: FSDP2 (bf16 weights gathered, fp32 gradients reduced) trains as the unsharded
    # run does, within bf16's rounding of the weights and the residual stream (a CPU runs it in fp32: exactly)
    if want("fsdp"):
        fsdp_dir = os.path.join(work, "fsdp")
        rc, lines = run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *train_args,
                         "--log_dir", fsdp_dir, "--fsdp"])
        fsdp_log = os.path.join(fsdp_dir, "log.txt")
        fsdp_tol = 2e-2 if device.type == "cuda" else 1e-5
        diff = max(max_diff(read_log(fsdp_log, s), read_log(os.path.join(run_dir, "log.txt"), s)) for s in ("train", "val"))
        if rc == 0 and diff <= fsdp_tol and len(read_log(fsdp_log, "hella")) == 3:
            report("fsdp", True, f"{STEPS} steps: max |train or val loss diff| vs unsharded {diff:.2g} (<= {fsdp_tol}); "
                                 "HellaSwag and samples ran")
        elif rc == 0:
            report("fsdp", False, f"losses differ from the unsharded run's by {diff:.2g} > {fsdp_tol}")
        else:
            failed("fsdp", rc, lines)

    # --preset gpt2-medium (350M) for a few steps of its recipe: the bigger model's speed and memory
    if want("medium"):
        medium_dir = os.path.join(work, "medium")
        medium = [] if not args.tiny else SIZES["tiny"]  # on a CPU: the preset's flags with a tiny shape
        rc, lines = run([py, "train_gpt2.py", "--preset", "gpt2-medium", "--data", shards, "--device", str(device),
                         "--max_steps", "5", "--warmup_steps", "2", "--eval_interval", "1000", "--val_tokens", "65536",
                         "--no-hellaswag", "--log_dir", medium_dir, *medium], timeout=900)
        med_steps = {int(m[1]): m for _, line in lines if (m := STEP_LINE.search(line))}
        if rc == 0 and sorted(med_steps) == list(range(5)):
            steady = [med_steps[s] for s in (2, 3, 4)]
            mfu = f", MFU {statistics.median(float(m[5]) for m in steady):.1f}%" if steady[0][5] else ""
            peak = next((line for _, line in lines if line.startswith("peak GPU memory")), "")
            header = next((line.split(" | ")[0] for _, line in lines if "parameters |" in line), "")
            report("medium", True, f"--preset gpt2-medium ({header}): median {statistics.median(float(m[3]) for m in steady):.0f}"
                                   f" ms/step, {statistics.median(float(m[4].replace(',', '')) for m in steady):,.0f} "
                                   f"tok/s{mfu}; {peak or 'no GPU memory figure (CPU)'}")
        else:
            failed("medium", rc, lines)

    # sample and export from the last checkpoint, on the device
    if want("sample"):
        t0 = time.time()
        rc, lines = run([py, "train_gpt2.py", "--init_from", ckpt, "--sample", "--device", str(device),
                         "--num_samples", "2", "--max_new_tokens", "32", "--prompt", "ROMEO:"])
        n = sum(line.startswith("ROMEO:") for _, line in lines)
        if rc == 0 and n == 2:
            report("sample", True, f"2 samples of 32 tokens in {time.time() - t0:.1f} s (process start included)")
        else:
            failed("sample", rc, lines)
    if want("export"):
        hf_dir = os.path.join(work, "hf")
        rc, lines = run([py, "train_gpt2.py", "--init_from", ckpt, "--export", hf_dir, "--device", str(device)])
        if rc == 0:
            from transformers import GPT2LMHeadModel
            hf = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
            ours = load_model(ckpt, device).eval()
            idx = torch.randint(0, GPT2_VOCAB, (2, ours.config.block_size), device=device,
                                generator=torch.Generator(device).manual_seed(0))
            with torch.no_grad():
                ref, got = hf(idx).logits, ours(idx)[0][..., :GPT2_VOCAB]
            rel = ((got - ref).norm() / ref.norm()).item()
            dtypes = {str(p.dtype) for p in hf.parameters()}
            ok = rel <= 1e-4 and dtypes == {"torch.float32"}
            report("export", ok, f"transformers logits vs ours, float32, 2 x {idx.size(1)} tokens: "
                                 f"||diff|| / ||ref|| = {rel:.1e} (<= 1e-4); weights {', '.join(dtypes)}")
        else:
            failed("export", rc, lines)

    # hellaswag.py on the device, the checkpoint, the fixture
    if want("hellaswag"):
        rc, lines = run([py, "hellaswag.py", "-m", ckpt, "-d", str(device), "--data", hellaswag_data])
        try:
            res = json.loads(lines[-1][1])
            ok = rc == 0 and res["examples"] == n_hellaswag
        except (IndexError, ValueError, KeyError):
            ok = False
        if ok:
            timing = next((line for _, line in lines if " examples in " in line), "")
            report("hellaswag", True, f"acc_norm {res['acc_norm']:.4f} on {n_hellaswag} examples; {timing}")
        else:
            failed("hellaswag", rc, lines)

    # --eval_only: the step-4 checkpoint holds the weights the run's step-4 val ran on (compiled there, eager here)
    if want("eval_only"):
        rc, lines = run([py, "train_gpt2.py", "--init_from", os.path.join(run_dir, "model_000004.pt"), "--eval_only",
                         "--data", shards, "--device", str(device), "--dtype", "auto", "--no-hellaswag",
                         *SIZES["tiny" if args.tiny else "gpt2"]])
        logged = read_log(os.path.join(run_dir, "log.txt"), "val").get(4)
        try:
            val = json.loads(lines[-1][1])["val_loss"]
        except (IndexError, ValueError, KeyError):
            val = None
        # log.txt keeps 4 decimals; on a GPU, bf16 eager vs compiled kernels round differently
        eval_tol = 5e-3 if device.type == "cuda" else 1e-4
        if rc == 0 and val is not None and logged is not None and abs(val - logged) <= eval_tol:
            report("eval_only", True, f"val loss {val:.4f} vs the run's {logged:.4f} at step 4 (within {eval_tol})")
        elif rc == 0:
            report("eval_only", False, f"val loss {val} vs the run's {logged} at step 4 (tolerance {eval_tol})")
        else:
            failed("eval_only", rc, lines)

    for line in figures:
        print(f"figure    {line}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed" + (f", {len(skip)} skipped" if skip else ""))
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
