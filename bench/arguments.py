"""Checks of the benchmarks' command-line arguments, shared so that each refuses a bad count the same way."""

import argparse

import torch


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, minimum: int, *names: str):
    """Stops with the parser's usage error where an option of `names` (given and not None) is below `minimum`: a
    count of 0 would otherwise end in a division by zero or an empty median after minutes of work."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be at least {minimum}, got {value}")


def checked_device(parser: argparse.ArgumentParser, device: str) -> torch.device:
    """--device as a `torch.device`: "auto" is CUDA where torch sees it, else the CPU; a CUDA device where torch
    sees none is the parser's usage error rather than an assertion deep in the run."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as error:
        parser.error(f"--device {device}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}, but torch sees no CUDA device")
    return device
