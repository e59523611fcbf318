"""Subcommands beyond `data`: tokenize, train, evaluate, run, recommend, verify."""

from __future__ import annotations

REGISTER: list = []
