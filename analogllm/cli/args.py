"""Arguments every command shares: ``--set key=value`` overrides of a profile or recipe."""

from __future__ import annotations

import argparse
from typing import Any

import yaml


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["adc.bits=6", "device.g_max=20"]`` → ``{"adc.bits": 6, "device.g_max": 20}``; values are
    parsed as YAML scalars/lists, so types are checked by the config itself."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {key.strip()}: {value!r} is not a valid value ({exc.__class__.__name__})") from None
    return out


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a field, e.g. --set adc.bits=6 (repeatable)")


__all__ = ["add_set_argument", "parse_overrides"]
