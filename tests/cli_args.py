"""Command-line arguments from a dict of dotted keys, as a user would type them."""

from __future__ import annotations

import json


def cli_value(value) -> str:
    """Strings as they are, everything else as JSON (which is YAML: numbers, null, lists and dicts keep their type)."""
    return value if isinstance(value, str) else json.dumps(value)


def cli_args(values: dict) -> list[str]:
    """``{"optim.lr": 0.1, "data.dataset": "breastmnist"}`` -> ``["--optim.lr", "0.1", "--data.dataset", ...]``."""
    return [token for key, value in values.items() for token in (f"--{key}", cli_value(value))]
