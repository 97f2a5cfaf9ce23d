"""``analogllm finetune RECIPE [--set key=value]``: LoRA adapters trained on a programmed chip."""

from __future__ import annotations

import argparse

from analogllm.cli.core import add_set_argument, parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="train LoRA adapters beside a programmed analogue chip (backprop, physics-aware, zeroth-order)",
        description="Convert a model, program one chip instance, age it, then train a fresh LoRA adapter per "
                    "gradient mode and print the measured table (digital, chip, chip + LoRA).",
    )
    p.add_argument("recipe", help="built-in recipe name (e.g. finetune-tiny, finetune-smollm2) or a YAML path")
    add_set_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from analogllm.recipes import load_recipe
    from analogllm.training.finetune import FinetuneRecipe, finetune

    recipe = load_recipe(FinetuneRecipe, args.recipe, parse_overrides(args.set))
    result = finetune(recipe, progress=not args.quiet)
    print()
    print(result.table())
    for r in result.modes:
        if r.notes:
            print(f"{r.mode}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.notes.items()))
    if recipe.out:
        print(f"\nwrote the chip, the adapters and results.json to {recipe.out}")
    return 0
