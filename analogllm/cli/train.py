"""``analogllm train``, ``analogllm eval`` and ``analogllm quickstart``: hardware-aware training recipes.

    analogllm quickstart                          # tiny model: evaluate → HWA-train → evaluate, prints the table
    analogllm train smollm2-pcm-hwa --set train.steps=40
    analogllm eval smollm2-pcm-hwa                # digital / analogue / analogue + HWA at every drift time
    torchrun --nproc_per_node 2 -m analogllm train quickstart    # data parallel (CPU or GPU)
    torchrun --nproc_per_node 2 -m analogllm train quickstart --set train.fsdp=true   # sharded (FSDP2)
    torchrun --nproc_per_node 2 -m analogllm train quickstart --set train.zero3=true  # sharded (ZeRO-3)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analogllm.cli.args import parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="hardware-aware training from a recipe (writes OUTPUT/final)",
                       description="Train a model to keep its accuracy on an analogue chip: training noise, "
                                   "clipping, learned DAC ranges, optional distillation from the digital model.")
    _recipe_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT/checkpoints")
    p.add_argument("--until", type=int, default=None, metavar="STEP",
                   help="stop after this optimiser step (the LR schedule still spans train.steps); resume later")
    p.set_defaults(func=run_train_command)

    p = sub.add_parser("eval", help="perplexity and token accuracy under drift, digital vs analogue (JSON, table, plot)",
                       description="Score the digital model, the analogue model before HWA training and, when "
                                   "OUTPUT/final exists (or --checkpoint), the trained one, at every drift time "
                                   "over every chip instance of the recipe.")
    _recipe_arguments(p)
    p.add_argument("--checkpoint", type=Path, default=None, help="trained analogue checkpoint (default OUTPUT/final)")
    p.set_defaults(func=run_eval_command)

    p = sub.add_parser("quickstart", help="the built-in demo: evaluate → HWA-train → evaluate, prints the table",
                       description="Run a recipe end to end in one process (default: the built-in quickstart, a "
                                   "tiny model that finishes in a few minutes on two CPU cores).")
    p.add_argument("--recipe", default="quickstart", help="recipe to run (default: quickstart)")
    _set_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_quickstart_command)


def _recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="built-in recipe name (quickstart, smollm2-pcm-hwa, ...) or a YAML path")
    _set_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a recipe field, e.g. --set train.steps=50 --set analog.overrides.adc.bits=6 "
                        "(repeatable)")


def _load(args: argparse.Namespace):
    """The recipe named on the command line, with its ``--set`` overrides; ``--quiet`` also silences
    the progress bars of transformers (checkpoint writing)."""
    from analogllm.training.config import load_hwa_recipe

    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    return load_hwa_recipe(args.recipe, parse_overrides(args.set))


def _print_reports(reports, paths: dict[str, Path]) -> None:
    for report in reports:
        print()
        print(f"## held-out text: {report.meta.get('text')}")
        print()
        print(report.markdown())
    print()
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def run_train_command(args: argparse.Namespace) -> int:
    from analogllm.training.pipeline import run_train

    recipe = _load(args)
    outcome = run_train(recipe, resume=args.resume, until=args.until, progress=not args.quiet)
    r = outcome.result
    from accelerate import PartialState

    if PartialState().is_main_process:
        loss = f", final loss {r.losses[-1]:.4f}" if r.losses else ""
        print(f"trained steps {r.resumed_from}→{r.steps} of {recipe.train.steps} on {r.processes} process(es) "
              f"in {r.seconds:.0f} s{loss}")
        if outcome.checkpoint is not None:
            print(f"wrote the analogue checkpoint to {outcome.checkpoint}")
        else:
            print(f"stopped before the end; continue with: analogllm train {args.recipe} --resume")
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    from analogllm.training.pipeline import run_eval

    recipe = _load(args)
    reports, paths = run_eval(recipe, checkpoint=args.checkpoint, progress=not args.quiet)
    _print_reports(reports, paths)
    return 0


def run_quickstart_command(args: argparse.Namespace) -> int:
    from analogllm.training.pipeline import run_quickstart

    recipe = _load(args)
    reports, paths = run_quickstart(recipe, progress=not args.quiet)
    _print_reports(reports, paths)
    return 0
