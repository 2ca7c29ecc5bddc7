"""`python -m app.config check FILE ...`: validate Serve config files without starting anything."""

from __future__ import annotations

import sys

from app.config.gateway import ConfigError
from app.config.serve_file import load_serve_config


def _check(paths: list[str]) -> int:
    failed = 0
    for path in paths:
        try:
            load_serve_config(path)
            print(f"{path}: ok")
        except (ConfigError, OSError, ValueError) as error:
            print(error, file=sys.stderr)
            failed += 1
    return 1 if failed else 0


USAGE = "usage: python -m app.config check FILE [FILE ...]"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "check":
        return _check(argv[1:])
    print(USAGE, file=sys.stderr)
    return 2
