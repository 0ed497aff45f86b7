"""Latency of one question through the "vqa-features" pipeline vs the bare model forward on the same input.

    python bench/pipeline_latency.py [--regions 36] [--repeats 200] [--threads N] [--device cpu]

A paper-size RWSANForVQA with random weights and a processor with paper-size vocabularies are saved to a temporary
folder and loaded back with `pipeline(...)`, as a user would. Both measurements run in one process, alternating,
so machine noise hits both alike; the bare forward gets the processor's tensors prepared once, under
`torch.no_grad()` as in the pipeline. Target: pipeline p50 within 20% of the forward's.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # bench is a folder of the repository, not part of the installed package.
    sys.path.insert(0, str(REPO_ROOT))

from bench.arguments import checked_device, require_at_least  # noqa: E402
from rwsan import RWSANConfig, RWSANForVQA  # noqa: E402
from rwsan.configuration_rwsan import PAPER_NUM_ANSWERS  # noqa: E402
from rwsan.pipeline_rwsan import RWSANVQAPipeline, save_for_pipeline  # noqa: E402
from rwsan.processing_rwsan import RWSANProcessor, build_question_tokenizer  # noqa: E402

PAPER_VOCAB_SIZE = 20573
QUESTION = "what color is the umbrella next to the man on the left"


def paper_size_processor() -> RWSANProcessor:
    question_words = list(dict.fromkeys(QUESTION.split()))
    words = question_words + [f"word{index}" for index in range(PAPER_VOCAB_SIZE - 2 - len(question_words))]
    vocab = {"PAD": 0, "UNK": 1, **{word: index for index, word in enumerate(words, start=2)}}
    return RWSANProcessor(
        build_question_tokenizer(vocab),
        id2label={index: f"answer {index}" for index in range(PAPER_NUM_ANSWERS)},
    )


def p50_milliseconds(times: list[float]) -> float:
    return statistics.median(times) * 1000


def measure(vqa: RWSANVQAPipeline, num_regions: int, warmup: int, repeats: int) -> dict:
    model, processor = vqa.model, vqa.processor
    features = np.random.default_rng(0).random((num_regions, model.config.image_feature_size), dtype=np.float32)
    item = {"question": QUESTION, "image_features": features}
    model_inputs = processor(text=[QUESTION], image_features=[features]).to(model.device)

    def run_pipeline():
        return vqa(item)

    def run_forward():
        with torch.no_grad():
            logits = model(**model_inputs).logits
        # The pipeline's answers are on the CPU; so are these.
        return logits.cpu()

    timings = {"pipeline": [], "forward": []}
    for _ in range(warmup):
        run_pipeline()
        run_forward()
    for _ in range(repeats):
        for name, run in (("pipeline", run_pipeline), ("forward", run_forward)):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)

    pipeline_p50, forward_p50 = p50_milliseconds(timings["pipeline"]), p50_milliseconds(timings["forward"])
    return {
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        # What the model sees: the processor keeps at most max_regions.
        "regions": model_inputs["image_features"].shape[1],
        "repeats": repeats,
        "pipeline_p50_ms": round(pipeline_p50, 3),
        "forward_p50_ms": round(forward_p50, 3),
        "overhead_ms": round(pipeline_p50 - forward_p50, 3),
        "overhead_percent": round(100 * (pipeline_p50 / forward_p50 - 1), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "regions", "repeats", "threads")
    require_at_least(parser, args, 0, "warmup")
    device = checked_device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    processor = paper_size_processor()
    with tempfile.TemporaryDirectory() as folder:
        model = RWSANForVQA(RWSANConfig(vocab_size=PAPER_VOCAB_SIZE, id2label=processor.id2label))
        save_for_pipeline(model, processor, folder)
        vqa = pipeline("vqa-features", model=folder, pipeline_class=RWSANVQAPipeline, device=device)
        report = measure(vqa, args.regions, args.warmup, args.repeats)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
