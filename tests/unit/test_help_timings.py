"""`--help` quotes no times measured on one machine (`~13 min`, `about 3 min`, `36 s`).

Measured times belong in the docs' Measured tables, with their date, machine and command; a help
text may give a rough size ("a few minutes on a laptop CPU").
"""

from __future__ import annotations

import argparse
import re

from opdlab.cli import build_parser

TIMING = re.compile(r"\d+(?:\.\d+)?\s*(?:min|mins|minutes?|s|secs?|seconds?|h|hours?)\b", re.I)


def _parsers(parser: argparse.ArgumentParser, prog: str = "opdlab"):
    """(command line, parser) for the top level and every subcommand, nested ones included."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def test_the_timing_pattern_tells_measured_times_from_rough_sizes():
    for text in ("~13 min", "about 3 min", "(36 s)", "2.8 minutes", "1 h"):
        assert TIMING.search(text), text
    for text in ("a few minutes on a laptop CPU", "16 samples", "100 steps", "--save-every N steps", "lr 1e-5"):
        assert not TIMING.search(text), text


def test_no_help_text_quotes_measured_minutes():
    found = []
    for command, parser in _parsers(build_parser()):
        for line in parser.format_help().splitlines():
            if TIMING.search(line):
                found.append(f"{command} --help: {line.strip()}")
    assert not found, "help texts quote measured times:\n" + "\n".join(found)
