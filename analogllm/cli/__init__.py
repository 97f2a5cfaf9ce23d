"""The ``analogllm`` command line.

Each command lives beside the subsystem it drives and registers itself through a
``register(subparsers)`` function; this file only lists those modules and dispatches. Errors that are
the user's (a bad config, a missing file, an unknown model) are printed as one clear line with exit
status 2, not as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from analogllm.config.schema import ConfigError

#: modules that define ``register(subparsers)``; the order is the order of ``analogllm --help``.
COMMAND_MODULES = [
    "analogllm.cli.core",
    "analogllm.cli.export",
    "analogllm.cli.interchange",
    "analogllm.cli.readback",
    "analogllm.cli.cost",
    "analogllm.cli.finetune",
    "analogllm.cli.train",
    "analogllm.cli.generate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analogllm",
        description="Run, train, fine-tune and export large language models for analogue hardware.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _quiet_deepspeed() -> None:
    """Tell DeepSpeed there is no accelerator when torch sees none. transformers' and accelerate's
    unwrapping import DeepSpeed whenever it is installed, and its accelerator detection then warns
    "Setting accelerator to CPU" on every CPU run, sharded or not; the CPU is what it would pick anyway."""
    import torch

    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    _quiet_deepspeed()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return _fail(args.command, exc)
    except ImportError as exc:  # an optional package the command needs (e.g. gguf for smollm2-135m)
        return _fail(args.command, exc)
    except OSError as exc:  # e.g. an --out folder that cannot be written
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return _fail(args.command, f"{exc.strerror or exc}{where}")


def _fail(command: str, exc: object) -> int:
    """One line on stderr, exit status 2: the user's input was wrong or the machine lacks something."""
    message = " ".join(str(exc).split())  # one line, whatever the exception put in it
    print(f"analogllm {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
