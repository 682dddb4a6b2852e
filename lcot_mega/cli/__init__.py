"""The `lcot-mega` command line: `main` parses and dispatches (`main.py`); `check.py` is `lcot-mega check`."""

from lcot_mega.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
