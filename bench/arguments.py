"""Checks of the benchmarks' command-line arguments, shared so that each refuses a bad count the same way."""

import argparse


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, minimum: int, *names: str):
    """Stops with the parser's usage error where an option of `names` (given and not None) is below `minimum`: a
    count of 0 would otherwise end in a division by zero or an empty median after minutes of work."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be at least {minimum}, got {value}")
