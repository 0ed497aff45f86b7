"""`plot_attention`: what the figure shows (top regions by weight, words, answers), where it is saved, bad inputs."""

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread
from matplotlib.patches import Rectangle

from rwsan.visualization import REGION_COLORMAP, plot_attention

BOXES = np.array(
    [[50, 60, 200, 220], [300, 100, 420, 260], [100, 300, 500, 460], [10, 10, 630, 470], [420, 40, 600, 200]],
    dtype=np.float32,
)
REGION_WEIGHTS = [0.05, 0.40, 0.10, 0.15, 0.30]
WORDS = ["what", "color", "is", "the", "cube"]
WORD_WEIGHTS = [0.1, 0.3, 0.05, 0.05, 0.5]
ANSWERS = [
    {"answer": "red", "score": 0.91},
    {"answer": "blue", "score": 0.06},
    {"answer": "green", "score": 0.02},
]


def plot(**overrides):
    arguments = dict(
        image=(640, 480),
        boxes=BOXES,
        region_weights=REGION_WEIGHTS,
        words=WORDS,
        word_weights=WORD_WEIGHTS,
        answers=ANSWERS,
        question="What color is the cube?",
        top_k_regions=3,
    )
    arguments.update(overrides)
    return plot_attention(**arguments)


def region_rectangles(axes) -> list[Rectangle]:
    """The region boxes drawn on the image panel (the blank canvas is the patch at zorder 0)."""
    return [patch for patch in axes.patches if isinstance(patch, Rectangle) and patch.get_zorder() > 0]


def test_the_top_regions_are_drawn_best_on_top_and_labelled_by_rank(tmp_path):
    figure = plot(path=tmp_path / "attention.png")
    image_axes, answer_axes, word_axes = figure.axes[:3]

    rectangles = region_rectangles(image_axes)
    # Regions 1 (0.40), 4 (0.30) and 3 (0.15), drawn from the third to the best.
    drawn = [
        (rectangle.get_x(), rectangle.get_y(), rectangle.get_width(), rectangle.get_height())
        for rectangle in rectangles
    ]
    assert drawn == [(10, 10, 620, 460), (420, 40, 180, 160), (300, 100, 120, 160)]
    assert [text.get_text() for text in image_axes.texts] == ["3: 0.15", "2: 0.30", "1: 0.40"]
    # The colour of each region is its weight on a scale from 0 to the largest weight (0.40): the best region gets
    # the end of the colour map, the others their share of it.
    expected = colormaps[REGION_COLORMAP]([0.15 / 0.40, 0.30 / 0.40, 1.0])
    np.testing.assert_allclose([rectangle.get_edgecolor() for rectangle in rectangles], expected)
    np.testing.assert_allclose([rectangle.get_facecolor()[:3] for rectangle in rectangles], expected[:, :3])
    assert image_axes.get_xlim() == (0, 640) and image_axes.get_ylim() == (480, 0)
    assert image_axes.get_title() == "top 3 of 5 regions by attention weight"

    assert [label.get_text() for label in answer_axes.get_yticklabels()] == ["red", "blue", "green"]
    assert [bar.get_width() for bar in answer_axes.patches] == pytest.approx([0.91, 0.06, 0.02])

    word_texts = [text.get_text() for text in word_axes.texts]
    assert word_texts == ["what", "0.10", "color", "0.30", "is", "0.05", "the", "0.05", "cube", "0.50"]
    assert figure.get_suptitle() == "What color is the cube?"

    picture = imread(tmp_path / "attention.png")
    assert picture.shape[:2] == (750, 1100) and picture[..., :3].std() > 0.1


def test_region_labels_of_boxes_that_share_a_corner_cover_no_other_label_and_stay_inside_the_image():
    """Drawn at each box's corner as they are, the labels of the first three boxes lay one over another, and the
    fourth's stood above the image."""
    boxes = np.array([[50, 60, 200, 220], [50, 60, 420, 260], [52, 62, 500, 460], [10, 0, 630, 470]], np.float32)
    figure = plot(boxes=boxes, region_weights=[0.3, 0.3, 0.2, 0.2], top_k_regions=4)
    renderer = figure.canvas.get_renderer()
    image_axes = figure.axes[0]
    labels = {text.get_text(): text for text in image_axes.texts}
    assert sorted(labels) == ["1: 0.30", "2: 0.30", "3: 0.20", "4: 0.20"]
    extents = [labels[text].get_window_extent(renderer) for text in sorted(labels)]
    assert not any(first.overlaps(second) for index, first in enumerate(extents) for second in extents[index + 1 :])
    assert all(extent.y1 <= image_axes.get_window_extent(renderer).y1 for extent in extents)
    # Each label keeps its box's left edge and is moved down, never up, from the box's top.
    for text, box in zip(sorted(labels), boxes):
        x, y = labels[text].get_position()
        assert x == pytest.approx(box[0]) and y >= box[1]
    # The best label is where it was drawn.
    assert labels["1: 0.30"].get_position() == (50, 60)


def test_a_numpy_region_count_is_taken_as_the_pipeline_takes_its_top_k():
    """The count often comes from numpy (an argmax, a saved array): refused here once, while the pipeline took it."""
    image_axes = plot(top_k_regions=np.int64(2)).axes[0]
    assert [text.get_text() for text in image_axes.texts] == ["2: 0.30", "1: 0.40"]
    assert image_axes.get_title() == "top 2 of 5 regions by attention weight"


def test_attention_spread_evenly_is_drawn_middling_not_strong():
    """The colour scale ends at twice the uniform weight when no weight is larger: five regions at 0.2 each take
    the middle of the colour map (the fixture's largest weight, 0.40, is exactly twice the uniform 0.2 and cannot
    tell the two ends apart)."""
    rectangles = region_rectangles(plot(region_weights=[0.2] * 5).axes[0])
    assert len(rectangles) == 3
    np.testing.assert_allclose(
        [rectangle.get_edgecolor() for rectangle in rectangles], [colormaps[REGION_COLORMAP](0.5)] * 3
    )


def test_word_shading_follows_the_weights():
    word_axes = plot().axes[2]
    words = [text for text in word_axes.texts if text.get_text() in WORDS]
    darkness = [1 - np.mean(text.get_bbox_patch().get_facecolor()[:3]) for text in words]
    assert np.argsort(darkness, kind="stable").tolist() == np.argsort(WORD_WEIGHTS, kind="stable").tolist()


def test_words_on_dark_shading_are_written_in_white():
    word_axes = plot().axes[2]
    colors = {text.get_text(): text.get_color() for text in word_axes.texts if text.get_text() in WORDS}
    # "cube" has the largest weight (the darkest blue), "is" one of the smallest.
    assert (colors["cube"], colors["is"]) == ("white", "black")


def test_a_word_wider_than_its_panel_starts_the_first_line_not_an_empty_one():
    word_axes = plot(words=["w" * 250, "cube"], word_weights=[0.4, 0.6]).axes[2]
    first_line = plot().axes[2].texts[0].get_position()[1]
    long_word, _, short_word, _ = word_axes.texts
    assert long_word.get_position()[1] == pytest.approx(first_line)
    assert short_word.get_position()[1] < first_line


def test_the_weights_of_short_words_do_not_run_into_each_other():
    """A weight is wider than "is" or "a": laid out by the words' widths alone, "0.27" and "0.24" touched."""
    words = ["is", "it", "a", "i", "cat"]
    figure = plot(words=words, word_weights=[0.27, 0.24, 0.2, 0.2, 0.09])
    renderer = figure.canvas.get_renderer()
    word_axes = figure.axes[2]
    for texts in (word_axes.texts[0::2], word_axes.texts[1::2]):  # the words, and the weights below them
        extents = [text.get_window_extent(renderer) for text in texts]
        assert all(left.x1 < right.x0 for left, right in zip(extents, extents[1:]))


def test_a_long_question_title_is_wrapped_to_the_figure():
    question = " ".join(["photographer's"] * 20) + "?"
    figure = plot(question=question)
    title = figure.get_suptitle()
    assert title.replace("\n", " ") == question and title.count("\n") >= 2
    figure.canvas.draw()
    extent = figure._suptitle.get_window_extent(figure.canvas.get_renderer())
    assert 0 <= extent.x0 and extent.x1 <= figure.bbox.width


@pytest.mark.parametrize("count", [12, 32])
def test_long_questions_wrap_inside_their_panel(count):
    words = ["supercalifragilistic"] * count
    word_axes = plot(words=words, word_weights=[1 / count] * count).axes[2]
    heights = sorted({text.get_position()[1] for text in word_axes.texts if text.get_text() == words[0]})
    assert len(heights) > (2 if count > 16 else 1)
    # Every word and every weight below it, on every line, inside the panel.
    assert all(0 <= text.get_position()[0] < 1 and 0 < text.get_position()[1] < 1 for text in word_axes.texts)


def test_dollar_signs_are_drawn_as_written_not_as_maths(tmp_path):
    # Matplotlib reads text between two dollar signs as a formula: "$5 or $10" lost its dollars and spaces, and
    # an unbalanced brace inside failed the drawing.
    question, answer, warning = "is it $5 {or $6?", "$5 or $6", "between $1 and $2"
    figure = plot(
        question=question,
        words=["is", "it", "$5", "{or", "$6"],
        word_weights=[0.2] * 5,
        answers=[{"answer": answer, "score": 0.7, "warning": warning}],
    )
    figure.savefig(tmp_path / "dollars.png")
    answer_axes, word_axes = figure.axes[1:3]
    texts = [figure._suptitle, *answer_axes.get_yticklabels(), *answer_axes.texts, *word_axes.texts]
    written = {text.get_text() for text in texts if "$" in text.get_text()}
    assert written == {question, answer, warning, "$5", "$6"}
    assert all(not text.get_parse_math() for text in texts if "$" in text.get_text())


def test_an_image_is_shown_under_the_boxes():
    photo = np.random.default_rng(0).random((480, 640, 3))
    image_axes = plot(image=photo).axes[0]
    assert len(image_axes.images) == 1
    assert image_axes.images[0].get_extent() == [0, 640, 480, 0]


def test_an_image_with_an_alpha_channel_is_shown_too():
    """`matplotlib.image.imread` reads a PNG as (height, width, 4)."""
    photo = np.random.default_rng(0).random((480, 640, 4))
    image_axes = plot(image=photo).axes[0]
    assert len(image_axes.images) == 1
    assert image_axes.images[0].get_extent() == [0, 640, 480, 0]


def test_without_image_or_size_the_canvas_holds_every_box():
    image_axes = plot(image=None).axes[0]
    assert image_axes.get_xlim() == (0, 630) and image_axes.get_ylim() == (470, 0)


def test_the_scores_are_written_inside_the_answer_panel():
    """A score near 1 is written inside its bar, where after it there would be no room: 0.91 ran off the panel."""
    figure = plot(answers=[{"answer": "red", "score": 0.91}, {"answer": "blue", "score": 0.5}])
    renderer = figure.canvas.get_renderer()
    answer_axes = figure.axes[1]
    panel = answer_axes.get_window_extent(renderer)
    scores = [text for text in answer_axes.texts if text.get_text() in ("0.910", "0.500")]
    assert len(scores) == 2
    for text in scores:
        extent = text.get_window_extent(renderer)
        assert panel.x0 <= extent.x0 and extent.x1 <= panel.x1, text.get_text()


def test_warnings_of_the_answers_are_shown():
    warning = "all question words are unknown to the vocabulary"
    answer_axes = plot(answers=[{**answer, "warning": warning} for answer in ANSWERS]).axes[1]
    assert warning in [text.get_text() for text in answer_axes.texts]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"boxes": None}, r"boxes is None: the regions cannot be drawn without their \(x1, y1, x2, y2\) boxes"),
        ({"boxes": BOXES[:, :3]}, r"boxes must be a \(num_regions, 4\) array with at least one region, got shape "
         r"\(5, 3\)"),
        ({"boxes": BOXES[:4]}, "boxes has 4 entries but region_weights has 5"),
        ({"boxes": np.where(np.arange(5)[:, None] == 2, np.nan, BOXES)},
         r"boxes must be finite; the boxes of regions \[2\] are not"),
        ({"words": WORDS[:4]}, "words has 4 entries but word_weights has 5"),
        ({"region_weights": [0.1, -0.2, 0.3, 0.4, 0.4]}, "region_weights must be finite and non-negative"),
        ({"word_weights": [0.1, np.nan, 0.3, 0.4, 0.4]}, "word_weights must be finite and non-negative"),
        ({"word_weights": [], "words": []}, "word_weights must be a non-empty list of numbers"),
        ({"answers": []}, "answers is empty"),
        ({"answers": [{"answer": "red"}]}, "answers\\[0\\] must be a dict with 'answer' and 'score', got "),
        ({"top_k_regions": 0}, "top_k_regions must be a positive integer, got 0"),
        ({"image": (640, 0)}, r"image size must be a positive \(width, height\), got \(640, 0\)"),
        ({"image": np.zeros((4, 4, 2))}, r"got an array of shape \(4, 4, 2\)"),
    ],
)  # fmt: skip
def test_bad_inputs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        plot(**overrides)
