"""Write a randomly initialised model of a real model's shape to disk, for memory and speed benchmarks.

    python scripts/make_random_model.py --shape llama-3.2-1b --out runs/llama-3.2-1b-random

The weights are random (no download): the shapes, and so the memory and the time of every step, are
those of the real model. The folder holds safetensors shards (``--shard-size``), the config and the
built-in tokenizer, so ``analogllm`` and ``scripts/bench_model.py --model FOLDER`` load it like any
saved model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

#: transformers config fields of the shapes this script knows (their published config.json)
SHAPES = {
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    p.add_argument("--shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    from transformers import AutoConfig, AutoModelForCausalLM

    from analogllm.fileio import atomic_dir
    from analogllm.hf.models import builtin_tokenizer

    fields = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp, max_shard_size=args.shard_size)
        builtin_tokenizer().save_pretrained(tmp)
    print(f"{args.shape}: {params / 1e9:.3f} B parameters (random), written to {args.out} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
