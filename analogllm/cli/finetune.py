"""``analogllm finetune RECIPE [--set key=value]``: LoRA adapters trained on a programmed chip."""

from __future__ import annotations

import argparse

from analogllm.cli.args import add_set_argument, parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="train LoRA adapters beside a programmed analogue chip (backprop, physics-aware, zeroth-order)",
        description="Load a model (a digital one is converted and mapped onto the chip; an analogue checkpoint "
                    "keeps its own), then for every chip instance and drift time train a fresh LoRA adapter per "
                    "gradient mode and print perplexity against drift time (digital, baseline chip, chip, "
                    "chip + LoRA) on every held-out text.",
    )
    p.add_argument("recipe", help="built-in recipe name (e.g. finetune-tiny, finetune-smollm2) or a YAML path")
    add_set_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from analogllm.recipes import load_recipe
    from analogllm.training.finetune import FinetuneRecipe, finetune, report_markdown

    recipe = load_recipe(FinetuneRecipe, args.recipe, parse_overrides(args.set))
    result = finetune(recipe, progress=not args.quiet)
    print()
    print(report_markdown(result))
    for r in result.modes:
        if r.notes:
            print(f"{r.mode} (chip {r.seed}, {r.seconds:g} s): " + ", ".join(f"{k} {v:.4g}" for k, v in r.notes.items()))
    if recipe.out:
        print(f"\nwrote the chip, the adapters, results.json, results.md and drift.png to {recipe.out}")
    return 0
