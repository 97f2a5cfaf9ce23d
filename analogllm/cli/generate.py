"""``analogllm generate``: text from a model running on a programmed chip, with the KV cache.

    analogllm generate smollm2-135m --profile pcm --prompt "The capital of France is" --seconds 86400

The model is an analogue checkpoint as saved, or a model converted to ``--profile`` and mapped onto the
chip from ``--calibration-blocks`` blocks of the built-in text. The chip instance ``--seed`` is
programmed and aged ``--seconds``; every generated token is one read of every analogue layer (fresh read
noise), so two runs with the same ``--sample-seed`` give the same text. ``--compare`` also generates
with the digital model and prints both speeds.

``--stream`` loads a saved digital model (a folder of safetensors) block by block straight onto the chip
(:func:`analogllm.hf.streaming.stream_deploy`): it never holds more than one decoder block of digital
weights, so a model runs in about its own size. Its digital weights are gone afterwards (no ``--compare``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from analogllm.cli.args import add_set_argument, parse_overrides
from analogllm.config import AnalogConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text on a programmed chip (KV cache), optionally beside the digital model",
                       description="Generate text with a model running on a programmed analogue chip.")
    p.add_argument("model", help="analogue checkpoint folder, or a built-in name / Hub id / path to convert")
    p.add_argument("--profile", default="pcm", help="device profile when converting (default: pcm)")
    add_set_argument(p)
    p.add_argument("--prompt", default="Once upon a time", help="text to continue (default: 'Once upon a time')")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--seed", type=int, default=0, help="chip instance (default 0)")
    p.add_argument("--seconds", type=float, default=0.0, help="time since programming (default 0)")
    p.add_argument("--calibration-blocks", type=int, default=16,
                   help="blocks of built-in text that map a converted model onto the chip (default 16; 0 = none)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the read noise and of sampling (default 0)")
    p.add_argument("--compare", action="store_true", help="also generate with the digital model and compare speed")
    p.add_argument("--stream", action="store_true",
                   help="load a saved digital model block by block onto the chip (bounded memory; no --compare)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from analogllm.chip import mode as hardware_mode
    from analogllm.chip import program_
    from analogllm.eval.generation import generate
    from analogllm.hf.checkpoint import load_analog_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.seconds < 0:
        raise ValueError(f"--seconds must be >= 0, got {args.seconds}")
    config = AnalogConfig.from_profile(args.profile, **parse_overrides(args.set))
    if args.stream:
        model, tokenizer = _streamed(args, config)
    else:
        model, tokenizer, is_checkpoint = load_analog_model(
            args.model, config, calibration_blocks=args.calibration_blocks, progress=True)
        if is_checkpoint and (args.set or args.profile != "pcm"):
            print(f"note: {Path(args.model)} is an analogue checkpoint; its own config is used (--profile/--set ignored)")
        model.eval()
        program_(model, seed=args.seed, seconds=args.seconds)
    text, n, seconds = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.sample, args.sample_seed)
    print(f"chip {args.seed} at t = {args.seconds:g} s ({model.analog_config.name}):")
    print(args.prompt + text)
    print(f"\n{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s on the chip")
    if args.compare:
        with hardware_mode(model, "digital"):
            text_d, n_d, seconds_d = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.sample,
                                              args.sample_seed)
        print("\ndigital:")
        print(args.prompt + text_d)
        print(f"\n{n_d} tokens in {seconds_d:.2f} s: {n_d / seconds_d:.1f} tokens/s digital; "
              f"chip / digital speed {(n / seconds) / (n_d / seconds_d):.2f}x")
    return 0


def _streamed(args: argparse.Namespace, config: AnalogConfig):
    """(model, tokenizer): the saved digital folder ``args.model`` loaded block by block onto the chip."""
    from transformers import AutoTokenizer

    from analogllm.data import calibration_blocks
    from analogllm.hf.checkpoint import is_analog_checkpoint
    from analogllm.hf.streaming import stream_deploy

    folder = Path(args.model).expanduser()
    if args.compare:
        raise ValueError("--stream keeps no digital weights, so there is nothing to --compare with; drop one of them")
    if not folder.is_dir() or is_analog_checkpoint(folder):
        raise ValueError(f"--stream needs a folder holding a saved digital model (safetensors), not {args.model!r}; "
                         "save one with save_pretrained, or drop --stream")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder}: no tokenizer to read ({exc}); save it beside the model") from None
    calibration = calibration_blocks(tokenizer, count=args.calibration_blocks)
    model = stream_deploy(folder, config, seed=args.seed, seconds=args.seconds, calibration=calibration, progress=True)
    return model, tokenizer
