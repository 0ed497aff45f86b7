"""Forward+backward samples/s of RWSANForVQA at the paper configuration, default (SDPA) path vs eager path.

    python bench/model_speed.py [--batch_size 64] [--regions 100] [--tokens 16] [--steps 5] [--threads N]

Both paths run in one process on the same inputs and weights, alternating, so machine noise hits both alike.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # bench is a folder of the repository, not part of the installed package.
    sys.path.insert(0, str(REPO_ROOT))

from bench.arguments import require_at_least  # noqa: E402
from rwsan import RWSANConfig, RWSANForVQA  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "batch_size", "regions", "tokens", "steps", "threads")
    require_at_least(parser, args, 0, "warmup")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = RWSANForVQA(RWSANConfig()).train()
    input_ids = torch.randint(2, model.config.vocab_size, (args.batch_size, args.tokens))
    image_features = torch.rand(args.batch_size, args.regions, model.config.image_feature_size)
    labels = torch.rand(args.batch_size, model.config.num_labels).lt(0.001).float()

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, image_features=image_features, labels=labels).loss.backward()

    timings = {"sdpa": [], "eager": []}
    for _ in range(args.warmup):
        for implementation in timings:
            model.set_attn_implementation(implementation)
            step()
    for _ in range(args.steps):
        for implementation, times in timings.items():
            model.set_attn_implementation(implementation)
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)

    results = {name: args.batch_size / statistics.median(times) for name, times in timings.items()}
    print(
        f"device cpu, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.regions} regions, "
        f"{args.tokens} tokens, median of {args.steps} forward+backward steps"
    )
    for name, samples_per_second in results.items():
        print(f"  {name:6s} {samples_per_second:8.1f} samples/s")
    print(f"  default (sdpa) / eager = {results['sdpa'] / results['eager']:.3f}")
    print(json.dumps({"samples_per_second": results}))
    return results


if __name__ == "__main__":
    main()
