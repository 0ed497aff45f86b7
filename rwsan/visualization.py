"""Pictures of what an RWSAN model looked at: its attention-flattening weights over image regions and question words.

Figures are drawn with matplotlib's Agg canvas directly (no `pyplot`), so plotting works without a display and
leaves pyplot's global state alone.
"""

import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .processing_rwsan import check_positive_int

REGION_COLORMAP = "autumn_r"
# Light enough to see the image through the shaded regions.
REGION_FILL_ALPHA = 0.25
REGION_LABEL_PAD = 1.5  # points of background around a region's rank label
WORD_COLORMAP = "Blues"
# Gray of the blank canvas drawn where there is no image.
BLANK_CANVAS_GRAY = 0.92
WORD_FONT_SIZE = 13
WORD_GAP = 0.012  # between words, as a fraction of the word panel's width
WORD_LINE_HEIGHT = 0.5  # a word and its weight below it, as a fraction of the word panel's height
TITLE_LINE_CHARACTERS = 100  # what fits the figure's width at the title's font size


def _check_same_length(first_name: str, first, second_name: str, second):
    if len(first) != len(second):
        raise ValueError(f"{first_name} has {len(first)} entries but {second_name} has {len(second)}")


def _weights_array(name: str, weights) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers, got shape {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    return weights


def _weight_scale(weights: np.ndarray) -> Normalize:
    """The colour scale of attention weights: from 0 to the largest weight, or to twice the uniform weight when
    that is larger, so that attention spread evenly reads as middling rather than as strong everywhere."""
    return Normalize(vmin=0.0, vmax=max(float(weights.max()), 2.0 / len(weights)))


def _image_and_size(image, boxes: np.ndarray) -> tuple[np.ndarray | None, tuple[float, float]]:
    """The image array to show (None for a blank canvas) and the (width, height) of the drawing."""
    if image is None:
        # Without an image or its size, the canvas just holds every box.
        return None, (float(boxes[:, 2].max()), float(boxes[:, 3].max()))
    if isinstance(image, Sequence) and len(image) == 2 and all(np.isscalar(side) for side in image):
        width, height = image
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be a positive (width, height), got {tuple(image)}")
        return None, (float(width), float(height))
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)) or 0 in image.shape:
        raise ValueError(
            f"image must be an (height, width) or (height, width, 3 or 4) array or a (width, height) size, got "
            f"an array of shape {image.shape}"
        )
    return image, (float(image.shape[1]), float(image.shape[0]))


def _draw_regions(axes, image, size, boxes, region_weights, top_k_regions):
    width, height = size
    if image is None:
        axes.add_patch(Rectangle((0, 0), width, height, color=str(BLANK_CANVAS_GRAY), zorder=0))
    else:
        axes.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, width, height, 0))
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_aspect("equal")
    axes.set_xticks([])
    axes.set_yticks([])

    colormap = colormaps[REGION_COLORMAP]
    norm = _weight_scale(region_weights)
    ranked = np.argsort(-region_weights, kind="stable")[:top_k_regions]
    # The best region is drawn last, on top of the others.
    for rank, region in reversed(list(enumerate(ranked, start=1))):
        x1, y1, x2, y2 = boxes[region]
        color = colormap(norm(region_weights[region]))
        axes.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                facecolor=(*color[:3], REGION_FILL_ALPHA),
                edgecolor=color,
                linewidth=2.5,
            )
        )
        axes.text(
            x1,
            y1,
            f"{rank}: {region_weights[region]:.2f}",
            fontsize=9,
            va="bottom",
            bbox={"facecolor": color, "edgecolor": "none", "pad": REGION_LABEL_PAD},
        )
    axes.set_title(f"top {len(ranked)} of {len(boxes)} regions by attention weight", fontsize=10)
    return ScalarMappable(norm=norm, cmap=colormap)


def _separate_region_labels(figure, axes):
    """Moves each region's rank label down, best region first, until it is inside the image's top edge and covers no
    better region's label: boxes that share a corner, as detected regions often do, would otherwise show one label
    over another, and a box at the image's top its label above the image."""
    renderer = figure.canvas.get_renderer()
    # The labels' backgrounds reach REGION_LABEL_PAD points beyond their text.
    pad = REGION_LABEL_PAD * figure.dpi / 72
    top = axes.get_window_extent(renderer).y1
    placed = []
    for label in reversed(axes.texts):
        extent = label.get_window_extent(renderer).padded(pad)
        shift = min(0.0, top - extent.y1)
        # Each move takes the label below the one it covered, so no label is met twice.
        while covered := [other for other in placed if extent.translated(0, shift).overlaps(other)]:
            shift = min(other.y0 for other in covered) - extent.y1 - 1
        if shift:
            x, y = axes.transData.transform(label.get_position())
            label.set_position(axes.transData.inverted().transform((x, y + shift)))
        placed.append(extent.translated(0, shift))


def _draw_answers(axes, answers):
    labels = [answer["answer"] for answer in answers]
    scores = [answer["score"] for answer in answers]
    positions = np.arange(len(answers))
    axes.barh(positions, scores, color="tab:blue")
    axes.set_yticks(positions, labels, parse_math=False)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("score")
    axes.set_title("answers", fontsize=10)
    for position, score in zip(positions, scores):
        # Inside the bar when there is no room after it.
        inside = score > 0.8
        axes.text(
            score - 0.02 if inside else score + 0.02,
            position,
            f"{score:.3f}",
            ha="right" if inside else "left",
            va="center",
            color="white" if inside else "black",
            fontsize=9,
        )
    warnings = sorted({answer["warning"] for answer in answers if answer.get("warning")})
    if warnings:
        axes.text(0, 1.12, "; ".join(warnings), transform=axes.transAxes, color="tab:red", fontsize=9, parse_math=False)


def _draw_words(figure, axes, words, word_weights):
    """Writes the words left to right, wrapping lines, each on a background shaded by its weight, with the weight
    below it. Lines are as tall as `WORD_LINE_HEIGHT`, or less where more lines must fit the panel."""
    axes.set_axis_off()
    colormap = colormaps[WORD_COLORMAP]
    norm = _weight_scale(word_weights)
    renderer = figure.canvas.get_renderer()
    axes_width = axes.get_window_extent(renderer).width
    placed = []  # (word text, weight text, x, word width, slot width, line)
    x, line = 0.0, 0
    for word, weight in zip(words, word_weights):
        shade = norm(weight)
        text = axes.text(
            x,
            0.0,
            word,
            parse_math=False,
            fontsize=WORD_FONT_SIZE,
            va="center",
            color="white" if shade > 0.6 else "black",
            bbox={"facecolor": colormap(shade), "edgecolor": "0.5", "pad": 3},
        )
        weight_text = axes.text(x, 0.0, f"{weight:.2f}", fontsize=8, ha="center", va="center")
        word_width = text.get_window_extent(renderer).width / axes_width
        # A short word ("is") is narrower than its weight, which would run into the next word's.
        slot_width = max(word_width, weight_text.get_window_extent(renderer).width / axes_width)
        if x > 0 and x + slot_width > 1:
            x, line = 0.0, line + 1
        placed.append((text, weight_text, x, word_width, slot_width, line))
        x += slot_width + WORD_GAP
    line_height = min(WORD_LINE_HEIGHT, 1 / (line + 1))
    for text, weight_text, x, word_width, slot_width, line in placed:
        y = 1.0 - line_height / 3 - line * line_height
        text.set_position((x + (slot_width - word_width) / 2, y))
        weight_text.set_position((x + slot_width / 2, y - line_height / 2))
    axes.set_title("question words by attention weight", fontsize=10, loc="left")
    return ScalarMappable(norm=norm, cmap=colormap)


def plot_attention(
    image,
    boxes,
    region_weights,
    words: Sequence[str],
    word_weights,
    answers: Sequence[Mapping],
    question: str | None = None,
    top_k_regions: int = 5,
    path: str | os.PathLike | None = None,
) -> Figure:
    """
    Draws what the model attended to: the `top_k_regions` regions with the largest attention-flattening weights
    on the image, shaded by weight; the question words, shaded by their weights; and the answers with their
    scores. The inputs are those of `pipeline("vqa-features", ...)(..., output_attentions=True)`.

    Args:
        image (`np.ndarray`, `(width, height)` or `None`):
            The image, `(height, width)` or `(height, width, 3 or 4)` (as read by `matplotlib.image.imread`), or
            only its size, drawn as a blank canvas; `None` draws a blank canvas that holds every box.
        boxes (`(num_regions, 4)` array-like):
            The regions' `(x1, y1, x2, y2)` boxes, in the pixels of `image`.
        region_weights (`(num_regions,)` array-like):
            The attention weight of each region.
        words (`Sequence[str]`), word_weights (array-like):
            The question words the model saw, and the attention weight of each.
        answers (`Sequence[Mapping]`):
            `{"answer": str, "score": float}` dicts, best first; a `"warning"` in them is shown too.
        question (`str`, *optional*):
            The question as asked, for the title.
        top_k_regions (`int`, *optional*, defaults to 5):
            How many regions to draw.
        path (`str` or `os.PathLike`, *optional*):
            Where to save the figure (the format follows the extension, e.g. `.png`).

    Returns:
        `matplotlib.figure.Figure`.
    """
    if boxes is None:
        # What the pipeline gives for features without boxes.
        raise ValueError("boxes is None: the regions cannot be drawn without their (x1, y1, x2, y2) boxes")
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise ValueError(f"boxes must be a (num_regions, 4) array with at least one region, got shape {boxes.shape}")
    not_finite = np.flatnonzero(~np.isfinite(boxes).all(axis=1))
    if len(not_finite):
        raise ValueError(f"boxes must be finite; the boxes of regions {not_finite[:5].tolist()} are not")
    region_weights = _weights_array("region_weights", region_weights)
    _check_same_length("boxes", boxes, "region_weights", region_weights)
    word_weights = _weights_array("word_weights", word_weights)
    _check_same_length("words", words, "word_weights", word_weights)
    if not answers:
        raise ValueError("answers is empty")
    for index, answer in enumerate(answers):
        if not isinstance(answer, Mapping) or "answer" not in answer or "score" not in answer:
            raise ValueError(f"answers[{index}] must be a dict with 'answer' and 'score', got {answer!r}")
    check_positive_int("top_k_regions", top_k_regions)
    image, size = _image_and_size(image, boxes)

    figure = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, height_ratios=(5, 1), width_ratios=(3, 1.4))
    image_axes = figure.add_subplot(grid[0, 0])
    answer_axes = figure.add_subplot(grid[0, 1])
    word_axes = figure.add_subplot(grid[1, :])

    region_colors = _draw_regions(image_axes, image, size, boxes, region_weights, top_k_regions)
    figure.colorbar(region_colors, ax=image_axes, label="region weight", shrink=0.8)
    _draw_answers(answer_axes, answers)
    if question is not None:
        figure.suptitle(textwrap.fill(question, TITLE_LINE_CHARACTERS), fontsize=14, parse_math=False)
    # The region labels and the words are laid out in the final size of their panels, known once the constrained
    # layout has run.
    figure.canvas.draw()
    figure.set_layout_engine("none")
    _separate_region_labels(figure, image_axes)
    _draw_words(figure, word_axes, words, word_weights)
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


__all__ = ["plot_attention"]
