"""
HellaSwag scoring speed: examples/s with --batch_size examples per forward pass against one example
(4 rows) per forward pass, for the same model on the same device, and their ratio. Prints figures;
it asserts nothing but that both ways count the same correct answers.

    python bench/bench_hellaswag.py --data ../shared/data/hellaswag                    # random GPT-2 124M, CPU
    python bench/bench_hellaswag.py --data ../shared/data/hellaswag --n_layer 2 --n_embd 128 --n_head 2
    python bench/bench_hellaswag.py --data ../shared/data/hellaswag --device cuda --limit 0   # full val set
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hellaswag import evaluate, load_examples  # noqa: E402
from devices import resolve_device  # noqa: E402
from train_gpt2 import GPT, GPTConfig, UsageError, load_model  # noqa: E402


def timed(model, examples, device, batch_size, autocast_dtype):
    t0 = time.time()
    counts = evaluate(model, examples, device, batch_size, autocast_dtype=autocast_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return counts, time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None,
                        help="anything hellaswag.py -m takes (default: a randomly initialised GPT of the sizes below)")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("-d", "--device", default="auto")
    parser.add_argument("--data", default=None, help="as in hellaswag.py")
    parser.add_argument("--limit", type=int, default=200, help="examples scored batched; 0 for the whole split")
    parser.add_argument("--single_limit", type=int, default=200,
                        help="of those, the first N scored one example per forward (slow on big sets); 0 skips")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
        examples = load_examples("val", args.data, args.limit)
        if args.model:
            model, name = load_model(args.model, device), args.model
        else:
            torch.manual_seed(0)
            config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
            model = GPT(config).to(device)
            name = f"random GPT {config.n_layer}L/{config.n_head}H/{config.n_embd}d ({model.num_params() / 1e6:.0f}M)"
    except UsageError as e:
        sys.exit(f"error: {e}")
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    print(f"{name} on {device} ({torch.get_num_threads()} CPU threads), autocast {autocast_dtype}")

    # warm up both shapes of work (allocator, kernels, cuBLAS), so neither run pays for it alone
    evaluate(model, examples[:2 * args.batch_size], device, args.batch_size, autocast_dtype=autocast_dtype)
    evaluate(model, examples[:4], device, 1, autocast_dtype=autocast_dtype)

    batched, dt = timed(model, examples, device, args.batch_size, autocast_dtype)
    rate = len(examples) / dt
    print(f"batched ({args.batch_size}/forward): {len(examples)} examples in {dt:.1f}s = {rate:.1f} examples/s, "
          f"acc_norm {batched[2] / batched[0]:.4f}")
    if args.single_limit:
        subset = examples[:args.single_limit]
        single, dt1 = timed(model, subset, device, 1, autocast_dtype)
        rate1 = len(subset) / dt1
        print(f"one per forward:   {len(subset)} examples in {dt1:.1f}s = {rate1:.1f} examples/s, "
              f"acc_norm {single[2] / single[0]:.4f}")
        print(f"batched / one per forward: {rate / rate1:.2f}x")
        if len(subset) == len(examples):
            assert single == batched, f"batched counts {batched} differ from one at a time {single}"


if __name__ == "__main__":
    main()
