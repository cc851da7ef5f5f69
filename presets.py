"""
--preset NAME: named defaults for train_gpt2.py's flags (any flag given overrides them). The GPT-2 family
follows llm.c's recipes and GPT-3's table 2.1 (docs/family.md); the Shakespeare presets run on a laptop CPU.
"""

import os

# the family trains on FineWeb-Edu sample-100BT, with the micro-batch that fits an 80 GB GPU under DDP, and
# skips a loss spike's update as llm.c's scripts do (-sl 7 -sg 7)
FAMILY_DATA = "edu_fineweb100B"
SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "input.txt")  # shipped


PRESETS = {
    "gpt2": {},  # 124M: the defaults are its recipe (GPT-3 Small's lr and batch, 10B tokens)
    # 124M for four epochs of the same 10B tokens (~40B), build-nanogpt's second run, toward GPT-3 124M's
    # HellaSwag: one warmup + cosine over all four; each epoch reads the shards and documents in a new order
    "gpt2-4epochs": dict(max_steps=4 * 19073, log_dir="log_gpt2_4epochs"),
    # 350M: llm.c's run, 31.5B tokens, cosine to 0
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, max_lr=3e-4, min_lr=0.0, warmup_steps=700,
                        max_steps=60000, batch_size=32, data=FAMILY_DATA, log_dir="log_gpt2-medium",
                        skip_outliers=7.0),
    # 774M: llm.c's lr, and XL's 32B tokens (llm.c ran 150B, more than sample-100BT holds)
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, max_lr=2.5e-4, min_lr=0.0, warmup_steps=700,
                       max_steps=61035, batch_size=16, data=FAMILY_DATA, log_dir="log_gpt2-large",
                       skip_outliers=7.0),
    # 1558M: llm.c's 24-hour run on one 8xH100 node, 33.6B tokens
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, max_lr=6e-4, warmup_steps=700, max_steps=32000,
                    total_batch_size=1048576, batch_size=8, data=FAMILY_DATA, log_dir="log_gpt2-xl",
                    skip_outliers=7.0),
    # OpenAI's 124M fine-tuned on Tiny Shakespeare as nanoGPT's finetune_shakespeare.py: a constant lr of 3e-5
    "shakespeare-finetune": dict(init_from="gpt2", data=SHAKESPEARE, log_dir="log_shakespeare_finetune",
                                 batch_size=8, total_batch_size=32768, max_lr=3e-5, min_lr=3e-5,
                                 warmup_steps=0, max_steps=20, eval_interval=5, val_tokens=32768,
                                 sample_interval=5, checkpoint_interval=10, hellaswag=False, prompt="ROMEO:",
                                 max_new_tokens=48),
    # a small GPT on the shipped Tiny Shakespeare: a few minutes on a 2-core laptop CPU
    "shakespeare": dict(data=SHAKESPEARE,
                        log_dir="log_shakespeare", n_layer=6, n_head=4, n_embd=128, block_size=128,
                        batch_size=16, seq_len=128, total_batch_size=4096, max_lr=2e-3, warmup_steps=20,
                        max_steps=250, eval_interval=25, val_tokens=16384, sample_interval=50,
                        checkpoint_interval=50, hellaswag=False, prompt="\n", max_new_tokens=48),
}
