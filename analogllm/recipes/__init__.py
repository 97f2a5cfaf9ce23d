"""Recipes: YAML files that the CLI runs, validated into frozen dataclasses.

A recipe names a built-in (``recipes/<name>.yaml``) or a path. Each command defines its own recipe
dataclass; this module only finds, reads, validates and overrides them, so every command reports a bad
key the same way: the key path, what was wrong, and the valid choices.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from analogllm.config.schema import ConfigError, from_dict, replace_path

R = TypeVar("R")


def recipe_names() -> list[str]:
    """Names of the built-in recipes."""
    files = resources.files("analogllm.recipes").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def read_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """The raw mapping of a recipe file or built-in recipe name."""
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text()
    elif str(name_or_path) in recipe_names():
        text = resources.files("analogllm.recipes").joinpath(f"{name_or_path}.yaml").read_text()
    else:
        raise ConfigError(
            f"recipe {str(name_or_path)!r}: no such file and not a built-in recipe "
            f"(built-in: {', '.join(recipe_names())})"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {str(name_or_path)!r}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(name_or_path)!r}: expected a mapping at the top level")
    return data


def load_recipe(cls: type[R], name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> R:
    """Read, validate and override (dotted keys, e.g. ``{"train.steps": 10}``) a recipe of type ``cls``."""
    recipe = from_dict(cls, read_recipe(name_or_path), where="recipe")
    for key, value in (overrides or {}).items():
        try:
            recipe = replace_path(recipe, key, value)
        except ConfigError as exc:
            raise ConfigError(f"--set {exc}") from None
    return recipe
