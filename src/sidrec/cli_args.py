"""argparse value types shared by every subcommand: ranges are checked where options enter."""

from __future__ import annotations

import argparse


def int_range(lo: int | None = None, hi: int | None = None):
    """An argparse `type` accepting integers in [lo, hi]; anything else is a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {span}, got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def one_char(text: str) -> str:
    """An argparse `type` for a field separator: exactly one character (\\t may be typed as a word)."""
    text = {"tab": "\t", "\\t": "\t"}.get(text, text)
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"must be one character (or 'tab'), got {text!r}")
    return text


def float_range(lo: float, hi: float):
    """An argparse `type` accepting finite numbers in [lo, hi]."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not lo <= v <= hi:  # also false for nan
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {text}")
        return v

    parse.__name__ = "number"
    return parse


def schema_option(p: argparse.ArgumentParser, flag: str, key: str, help: str) -> None:
    """An option that sets config key `key`: its type, range, choices and default come from
    config.SCHEMA / DEFAULTS, so a flag and the key it mirrors never disagree."""
    from sidrec.config import DEFAULTS, SCHEMA

    spec, (section, name) = SCHEMA[key], key.split(".", 1)
    default = DEFAULTS[section][name]
    kw = {"type": int_range(spec[1], spec[2])} if spec[0] == "int" else \
        {"choices": list(spec[1])} if spec[0] == "choice" else {}
    p.add_argument(flag, default=default, help=f"{help} (default {default}; the config's {key})", **kw)
