"""What a training run leaves beside its model: a plot of the training curves and a hub model card."""

import json
import numbers
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CITATION = """@article{qin2022rwsan,
  author  = {Qin, Bosheng and Hu, Haoji and Zhuang, Yueting},
  title   = {Deep Residual Weight-Sharing Attention Network with Low-Rank Attention for Visual Question Answering},
  journal = {IEEE Transactions on Multimedia},
  year    = {2022},
  doi     = {10.1109/TMM.2022.3173131}
}"""

ANSWER_TYPES = ("yes/no", "number", "other")


def _say_on(axis, text: str):
    """Writes `text` in the middle of an empty panel, whose ticks would only show matplotlib's default range."""
    axis.set_xticks([])
    axis.set_yticks([])
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes)


def training_history_figure(log_history: list[dict], eval_split: str = "val") -> Figure:
    """Training loss, learning rate and the VQA accuracy on `eval_split` against epochs, from
    `trainer.state.log_history`, as far as the training's summary (`train_runtime`): what is logged after it is no
    part of the training's course (an evaluation of the best checkpoint, reloaded at the end, say)."""
    end = next((index for index, entry in enumerate(log_history) if "train_runtime" in entry), len(log_history))
    log_history = log_history[:end]
    training = [entry for entry in log_history if "loss" in entry and "epoch" in entry]
    evaluations = [entry for entry in log_history if "eval_accuracy" in entry]
    # A bare Figure on the Agg canvas: importing this module must not change the user's pyplot backend.
    figure = Figure(figsize=(15, 4))
    FigureCanvasAgg(figure)
    loss_axis, rate_axis, accuracy_axis = figure.subplots(1, 3)

    # Markers: a line of one logged point draws nothing.
    loss_axis.plot([entry["epoch"] for entry in training], [entry["loss"] for entry in training], ".-")
    loss_axis.set(title="training loss", xlabel="epoch", ylabel="BCE (summed over answers)")
    rates = [entry for entry in training if "learning_rate" in entry]
    rate_axis.plot([entry["epoch"] for entry in rates], [entry["learning_rate"] for entry in rates], ".-")
    rate_axis.set(title="learning rate", xlabel="epoch")
    for axis, logged in ((loss_axis, training), (rate_axis, rates)):
        if not logged:
            _say_on(axis, "nothing logged\n(fewer steps than --logging_steps,\nor --logging_strategy no)")
    rate_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    epochs = [entry["epoch"] for entry in evaluations]
    accuracy_axis.plot(epochs, [entry["eval_accuracy"] for entry in evaluations], "o-", label="overall")
    for answer_type in ANSWER_TYPES:
        key = f"eval_accuracy_{answer_type}"
        if evaluations and key in evaluations[0]:
            accuracy_axis.plot(epochs, [entry[key] for entry in evaluations], ".--", label=answer_type)
    accuracy_axis.set(title=f"{eval_split} VQA accuracy", xlabel="epoch", ylabel="%")
    if evaluations:
        accuracy_axis.legend()
    else:
        _say_on(accuracy_axis, "nothing evaluated during training")
    figure.tight_layout()
    return figure


def plot_training_history(log_history: list[dict], path: str | Path, eval_split: str = "val") -> Path:
    """Saves `training_history_figure(log_history, eval_split)` as the image `path`."""
    path = Path(path)
    training_history_figure(log_history, eval_split).savefig(path, dpi=100)
    return path


def write_model_card(
    output_dir: str | Path,
    config,
    provenance: str,
    metrics: dict | None = None,
    model_id: str | None = None,
    license: str = "apache-2.0",
    datasets: tuple[str, ...] = ("vqa_v2",),
    eval_split: str | None = None,
    folder: str | Path | None = None,
) -> Path:
    """A hub model card (README.md with metadata) for an RWSANForVQA folder.

    `provenance` is a sentence saying where the weights come from ("trained with ... on ...", "converted from ...").
    `license` is the weights' license, and `datasets` the hub datasets they were trained on (none: the metadata
    names none), as the hub names them.
    `eval_split` names the split the accuracies were measured on.
    `model_id` is the hub repository the usage example loads. Without one, the example loads `folder`, the path
    as given (by default `output_dir`; give the final one where the card is written in a folder renamed afterwards),
    and says to put the hub id in its place once uploaded.
    """
    metrics = metrics or {}
    accuracy_rows = "\n".join(
        f"| {name.removeprefix('eval_')} | {f'{value:.2f}' if isinstance(value, numbers.Real) else '-'} |"
        for name, value in metrics.items()
        if name.startswith("eval_accuracy") or name.startswith("baseline_")
    )
    sizes = {
        name: getattr(config, name)
        for name in (
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "num_srwsa_repeats",
            "num_sgrwsa_repeats",
            "text_self_attention_rank",
            "image_self_attention_rank",
            "guided_attention_rank",
            "vocab_size",
            "num_labels",
        )
    }
    loaded = model_id or os.fspath(output_dir if folder is None else folder)
    loaded_note = "" if model_id else "  # once uploaded, its hub id (user/name)"
    dataset_lines = "".join(["datasets:\n", *(f"- {dataset}\n" for dataset in datasets)]) if datasets else ""
    card = f"""---
license: {license}
library_name: transformers
pipeline_tag: visual-question-answering
tags:
- rwsan
- vqa
- visual-question-answering
- bottom-up-attention
{dataset_lines}metrics:
- accuracy
---

# RWSAN for visual question answering

A Residual Weight-Sharing Attention Network with Low-Rank Attention (Qin, Hu & Zhuang, IEEE TMM 2022), {provenance}
It answers questions about an image from its precomputed bottom-up-attention region features (Faster R-CNN, up to
{config.max_regions} regions of {config.image_feature_size} values).

## Configuration

```json
{json.dumps(sizes, indent=2)}
```

## Results{f" on `{eval_split}`" if eval_split else ""} (VQA accuracy in %, as the original's vqaEval.py computes it)

| metric | value |
| --- | --- |
{accuracy_rows or "| (no evaluation split) | |"}

## How to use

```python
from transformers import pipeline

# With the rwsan package installed (`pip install -e .` in its repository) and `import rwsan`:
# pipeline("vqa-features", model=...), without remote code.
answer = pipeline(model="{loaded}", trust_remote_code=True){loaded_note}
# features: a (regions, {config.image_feature_size}) array, or the path of a per-image .npz
answer({{"question": "what color is the cube?", "image_features": features}})
```

## Citation

```bibtex
{CITATION}
```
"""
    path = Path(output_dir) / "README.md"
    path.write_text(card)
    return path
