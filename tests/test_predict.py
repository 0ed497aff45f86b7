"""`python -m rwsan.predict`: one question (with its attention plot) and a whole prepared toy split, the prediction
file, and the command-line errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread, imsave
from test_pipeline import tiny_model_for

import train_vqa
from data_scripts.make_toy_vqa import make_toy_vqa
from data_scripts.prepare_vqa import prepare_vqa
from rwsan import RWSANForVQA
from rwsan import predict as predict_module
from rwsan.data import VQACollator, load_vqa_dataset
from rwsan.pipeline_rwsan import MODEL_INPUT_NAMES, RWSANVQAPipeline, save_for_pipeline
from rwsan.predict import PredictionError, main, write_predictions
from rwsan.processing_rwsan import RWSANProcessor
from rwsan.visualization import plot_attention

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_FEATURE_SIZE = 24


@pytest.fixture(scope="session")
def toy_vqa(tmp_path_factory) -> Path:
    """A toy VQA set of 60 images, prepared; returns the prepared folder (the raw files are in `../raw`). Smaller
    sets keep one answer (the vocabulary takes answers seen 9 times), and every prediction would be it."""
    root = tmp_path_factory.mktemp("toy_vqa")
    make_toy_vqa(root / "raw", seed=0, num_images=60, feature_size=TOY_FEATURE_SIZE, questions_per_image=5)
    prepare_vqa(root / "raw", root / "prepared", feature_size=TOY_FEATURE_SIZE)
    return root / "prepared"


@pytest.fixture(scope="session")
def toy_model_dir(toy_vqa, tmp_path_factory) -> Path:
    """A tiny random RWSAN with the toy set's vocabularies, saved with its processor and the pipeline."""
    processor = RWSANProcessor.from_pretrained(toy_vqa / "processor")
    folder = tmp_path_factory.mktemp("toy_model")
    model = tiny_model_for(processor)
    # The random head's biases would give most questions one answer whatever they ask.
    with torch.no_grad():
        model.classifier.bias.zero_()
    save_for_pipeline(model, processor, folder)
    return folder


@pytest.fixture(scope="session")
def toy_features_file(toy_vqa) -> Path:
    """A toy image's features as the original release ships them: `x` (feature_size, N), bbox, image_h/w."""
    return sorted((toy_vqa.parent / "raw" / "coco_extract" / "val2014").glob("*.npz"))[0]


def run_main(*arguments: str):
    main([*arguments, "--device", "cpu"])


def test_predictions_of_a_split_prepared_without_some_questions_come_with_a_warning(
    toy_vqa, toy_model_dir, tmp_path, capsys
):
    """A test split prepared with --allow_incomplete_eval_splits answers only the questions it kept; the evaluation
    server wants every one. A whole split gives no warning."""
    run_main("--model", str(toy_model_dir), "--dataset_dir", str(toy_vqa), "--output", str(tmp_path / "whole.json"))
    assert "warning" not in capsys.readouterr().err

    raw = tmp_path / "raw"
    shutil.copytree(toy_vqa.parent / "raw", raw)
    removed = sorted((raw / "coco_extract" / "test2015").glob("*.npz"))[0]
    image_id = int(removed.name.split("_")[-1].split(".")[0])
    removed.unlink()
    prepare_vqa(raw, tmp_path / "prepared", feature_size=TOY_FEATURE_SIZE, allow_incomplete_eval_splits=True)
    questions = json.loads((raw / "vqa" / "v2_OpenEnded_mscoco_test2015_questions.json").read_text())["questions"]
    num_removed = sum(question["image_id"] == image_id for question in questions)
    assert num_removed > 0
    warning = (
        f"warning: questions were left out when the split was prepared (test {num_removed} of {len(questions):,}); "
        "the predictions do not answer them, and the evaluation server expects an answer to every question\n"
    )
    output = tmp_path / "predictions.json"
    run_main("--model", str(toy_model_dir), "--dataset_dir", str(tmp_path / "prepared"), "--output", str(output))
    assert len(json.loads(output.read_text())) == len(questions) - num_removed
    assert capsys.readouterr().err.endswith(warning)
    # train_vqa.py --do_predict says so too.
    train_vqa.main([
        "--model_name_or_path", str(toy_model_dir), "--dataset_dir", str(tmp_path / "prepared"),
        "--output_dir", str(tmp_path / "run"), "--do_train", "false", "--do_eval", "false", "--do_predict",
        "--use_cpu", "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--report_to", "none",
    ])  # fmt: skip
    assert json.loads((tmp_path / "run" / "predictions_test.json").read_text()) == json.loads(output.read_text())
    assert capsys.readouterr().err.endswith(warning)


# None: the default, the whole test set, which the evaluation server takes for both its phases.
@pytest.mark.parametrize("split", [None, "test-dev", "val"])
def test_a_split_is_answered_once_per_question_in_the_server_format(toy_vqa, toy_model_dir, tmp_path, split):
    output = tmp_path / "out" / "predictions.json"
    split_arguments = ["--split", split] if split is not None else []
    run_main("--model", str(toy_model_dir), "--dataset_dir", str(toy_vqa), *split_arguments,
             "--output", str(output), "--batch_size", "3")  # fmt: skip
    split = split or "test"

    predictions = json.loads(output.read_text())
    dataset = load_vqa_dataset(toy_vqa, split)
    assert len(dataset) > 3
    # Answers that differ by question, for the comparison below to tell questions apart.
    assert len({prediction["answer"] for prediction in predictions}) >= 2
    assert [prediction["question_id"] for prediction in predictions] == dataset.question_ids.tolist()
    assert all(prediction.keys() == {"question_id", "answer"} for prediction in predictions)
    assert all(type(prediction["question_id"]) is int for prediction in predictions)
    # Batches of three padded questions give the answer of each question alone.
    model = RWSANForVQA.from_pretrained(toy_model_dir).eval()
    collator = VQACollator(model.config.num_labels)
    for index, prediction in enumerate(predictions):
        batch = collator([dataset[index]])
        with torch.no_grad():
            logits = model(**{name: batch[name] for name in MODEL_INPUT_NAMES}).logits
        assert prediction["answer"] == model.config.id2label[logits.argmax().item()]


def test_a_split_is_answered_with_the_cuts_of_the_models_processor(toy_vqa, toy_model_dir, tmp_path):
    """The model's processor, not the prepared data's, says how much of each question and image the model reads, as
    the pipeline reads them."""
    folder = tmp_path / "model"
    shutil.copytree(toy_model_dir, folder)
    processor = RWSANProcessor.from_pretrained(folder)
    processor.max_question_length, processor.max_regions = 4, 3
    processor.save_pretrained(folder)
    output = tmp_path / "predictions.json"
    run_main("--model", str(folder), "--dataset_dir", str(toy_vqa), "--split", "val", "--output", str(output))
    answers = [prediction["answer"] for prediction in json.loads(output.read_text())]

    model = RWSANForVQA.from_pretrained(folder).eval()

    def answers_cut_to(max_question_length, max_regions):
        cuts = {"max_question_length": max_question_length, "max_regions": max_regions}
        dataset = load_vqa_dataset(toy_vqa, "val", **cuts)
        collator = VQACollator(model.config.num_labels, **cuts)
        batch = collator([dataset[index] for index in range(len(dataset))])
        with torch.no_grad():
            logits = model(**{name: batch[name] for name in MODEL_INPUT_NAMES}).logits
        return [model.config.id2label[index] for index in logits.argmax(-1).tolist()]

    assert answers == answers_cut_to(4, 3)
    # The cuts matter to these answers: a prediction of the uncut questions and images would be told apart.
    assert answers != answers_cut_to(16, 100)


def test_one_question_prints_the_pipeline_answers_and_plots_them(toy_model_dir, toy_features_file, tmp_path, capsys):
    question = "What color is the ball?"
    plot = tmp_path / "attention.png"
    run_main("--model", str(toy_model_dir), "--features", str(toy_features_file), "--question", question,
             "--top_k", "3", "--plot", str(plot))  # fmt: skip

    vqa = RWSANVQAPipeline(
        model=RWSANForVQA.from_pretrained(toy_model_dir),
        processor=RWSANProcessor.from_pretrained(toy_model_dir),
        device="cpu",
    )
    expected = vqa({"question": question, "image_features": str(toy_features_file)}, top_k=3)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        *(f"{rank}. {answer['answer']}\t{answer['score']:.4f}" for rank, answer in enumerate(expected, start=1)),
        f"Wrote {plot}",
    ]
    # A blank canvas of the stored image size (640 x 480 or so), with the words and answers beside and below.
    picture = imread(plot)
    assert picture.shape[:2] == (750, 1100)
    assert picture[..., :3].std() > 0.1


def test_the_plot_is_drawn_on_the_photo(toy_model_dir, toy_features_file, tmp_path, capsys, monkeypatch):
    photo = tmp_path / "photo.png"
    # Half the size of the image the features come from: the boxes are scaled to it.
    with np.load(toy_features_file) as archive:
        stored_height, stored_width, stored_boxes = int(archive["image_h"]), int(archive["image_w"]), archive["bbox"]
    height, width = stored_height // 2, stored_width // 2
    pixels = np.random.default_rng(0).random((height, width, 3))
    imsave(photo, pixels)
    drawn = []

    def recording_plot(image, boxes, *args, **kwargs):
        drawn.append((image, boxes))
        return plot_attention(image, boxes, *args, **kwargs)

    monkeypatch.setattr(predict_module, "plot_attention", recording_plot)
    plot = tmp_path / "plots" / "on_photo.png"
    run_main("--model", str(toy_model_dir), "--features", str(toy_features_file), "--question", "is there a cube",
             "--plot", str(plot), "--image", str(photo))  # fmt: skip
    assert capsys.readouterr().out.endswith(f"Wrote {plot}\n")
    assert plot.stat().st_size > 10_000
    [(image, boxes)] = drawn
    np.testing.assert_allclose(image[..., :3], pixels, atol=1 / 255)
    scale = np.array([width / stored_width, height / stored_height] * 2)
    np.testing.assert_allclose(boxes, stored_boxes[: len(boxes)] * scale, rtol=1e-6)


def test_a_plot_of_features_without_boxes_fails_before_any_answer_is_printed(toy_model_dir, toy_features_file,
                                                                             tmp_path, capsys):  # fmt: skip
    without_boxes = tmp_path / "no_boxes.npz"
    np.savez(without_boxes, x=np.load(toy_features_file)["x"])
    with pytest.raises(PredictionError, match="^the features file has no 'bbox' array: the regions cannot be drawn$"):
        run_main("--model", str(toy_model_dir), "--features", str(without_boxes), "--question", "what color",
                 "--plot", str(tmp_path / "p.png"))  # fmt: skip
    assert capsys.readouterr().out == "" and not (tmp_path / "p.png").exists()


def test_a_question_of_unknown_words_prints_the_warning(toy_model_dir, toy_features_file, capsys):
    run_main("--model", str(toy_model_dir), "--features", str(toy_features_file), "--question", "Xylophone?")
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line == "warning: all question words are unknown to the vocabulary"


def test_write_predictions_writes_the_server_format(tmp_path):
    path = tmp_path / "predictions.json"
    id2label = {0: "yes", 1: "no", 2: "red"}
    written = write_predictions(torch.tensor([30, 10, 20]), np.array([2, 0, 0]), id2label, path)
    expected = [
        {"question_id": 30, "answer": "red"},
        {"question_id": 10, "answer": "yes"},
        {"question_id": 20, "answer": "yes"},
    ]
    assert written == expected and json.loads(path.read_text()) == expected


@pytest.mark.parametrize(
    "question_ids, answer_indices, message",
    [
        ([1, 2, 1, 3], [0, 0, 0, 0], "1 question ids appear more than once \\(e.g. 1\\)"),
        ([1, 2], [0], "2 question ids but 1 answers"),
        ([1, 2], [0, 5], "answer indices \\[5\\] are not in id2label \\(answer ids 0..2\\)"),
        ([], [], "no questions to write: the evaluation server wants an answer to each of a split's"),
        # float32 would turn question 175651001 into 175651008, another question
        (
            np.array([175651001, 175651101], np.float32),
            [0, 1],
            "question_ids must be a one-dimensional sequence of integers, got float32 of shape \\(2,\\)",
        ),
        ([1, 2], [0.9, 1.7], "answer_indices must be a one-dimensional sequence of integers, got float64"),
        ([[1, 2], [3, 4]], [[0, 1], [1, 0]], "question_ids must be .* got int64 of shape \\(2, 2\\)"),
    ],
)
def test_write_predictions_refuses_bad_predictions(tmp_path, question_ids, answer_indices, message):
    with pytest.raises(ValueError, match=message):
        write_predictions(question_ids, answer_indices, {0: "yes", 1: "no", 2: "red"}, tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_write_predictions_refuses_answers_that_are_not_text(tmp_path):
    with pytest.raises(ValueError, match="id2label's answers must be strings; answer 1 is None"):
        write_predictions([1, 2], [0, 1], {0: "yes", 1: None}, tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_write_predictions_refuses_an_id2label_with_string_keys(tmp_path):
    with pytest.raises(ValueError, match="id2label must have integer keys, as config.id2label has; it has '0'"):
        write_predictions([1], [0], {"0": "yes"}, tmp_path / "p.json")
    written = write_predictions([1, 2], [1, 0], dict(zip(np.arange(2), ["yes", "no"])), tmp_path / "p.json")
    assert written == [{"question_id": 1, "answer": "no"}, {"question_id": 2, "answer": "yes"}]


def test_an_unwritable_output_is_refused_before_answering(toy_vqa, tmp_path):
    """Else a whole split is answered first, then lost. (The model folder is missing too: its check comes after.)"""
    absent_model = str(tmp_path / "absent")
    with pytest.raises(PredictionError, match=f"^{tmp_path} is a folder; name the file to write, e.g. "):
        run_main("--model", absent_model, "--dataset_dir", str(toy_vqa), "--output", str(tmp_path))
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    output = a_file / "sub" / "p.json"
    with pytest.raises(PredictionError, match=f"^cannot write {output}: {a_file} is a file, not a folder$"):
        run_main("--model", absent_model, "--dataset_dir", str(toy_vqa), "--output", str(output))
    assert a_file.read_text() == "kept"
    # Only an earlier predictions file is replaced: a mistyped path could name a model's config.
    not_predictions = tmp_path / "config.json"
    not_predictions.write_text('{"hidden_size": 512}')
    message = rf"^{not_predictions} exists and is no predictions file \(\[\{{question_id"
    with pytest.raises(PredictionError, match=message):
        run_main("--model", absent_model, "--dataset_dir", str(toy_vqa), "--output", str(not_predictions))
    assert not_predictions.read_text() == '{"hidden_size": 512}'
    # An earlier predictions file, or an empty file (mktemp's), passes the check.
    earlier = tmp_path / "earlier.json"
    earlier.write_text('[{"question_id": 1, "answer": "yes"}]')
    (tmp_path / "empty.json").touch()
    for output in (earlier, tmp_path / "empty.json"):
        with pytest.raises(PredictionError, match="^model folder not found"):
            run_main("--model", absent_model, "--dataset_dir", str(toy_vqa), "--output", str(output))
    # A writable place passes the check; its missing folders are made only when the answers are written.
    with pytest.raises(PredictionError, match="^model folder not found"):
        run_main("--model", absent_model, "--dataset_dir", str(toy_vqa), "--output", str(tmp_path / "new" / "p.json"))
    assert not (tmp_path / "new").exists()


@pytest.fixture
def read_only_file(tmp_path):
    """An earlier predictions file that cannot be written: read-only, and where permissions do not bind (root),
    immutable."""
    path = tmp_path / "read_only.json"
    path.write_text('[{"question_id": 1, "answer": "yes"}]')
    path.chmod(0o444)
    immutable = os.access(path, os.W_OK)
    if immutable and (shutil.which("chattr") is None or subprocess.run(["chattr", "+i", path]).returncode):
        pytest.skip("running as root where chattr cannot make a file immutable: no file here is unwritable")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", path], check=True)


def test_an_earlier_predictions_file_that_cannot_be_written_is_refused_before_answering(toy_vqa, read_only_file):
    with pytest.raises(PredictionError, match=f"^cannot write {read_only_file}: "):
        run_main("--model", "absent", "--dataset_dir", str(toy_vqa), "--output", str(read_only_file))
    assert read_only_file.read_text() == '[{"question_id": 1, "answer": "yes"}]'


def test_splits_that_share_questions_are_refused_before_answering(toy_vqa, toy_model_dir, tmp_path, monkeypatch):
    """test-dev is a part of test: the predictions file could not answer its questions twice."""
    monkeypatch.setattr(predict_module, "tqdm", lambda *args, **kwargs: pytest.fail("the split was answered"))
    output = tmp_path / "p.json"
    with pytest.raises(ValueError, match=r"^split test\+test-dev: \d+ questions are in more than one of its splits"):
        run_main("--model", str(toy_model_dir), "--dataset_dir", str(toy_vqa), "--split", "test+test-dev",
                 "--output", str(output))  # fmt: skip
    assert not output.exists()


def test_missing_model_and_files_are_reported(toy_vqa, toy_model_dir, toy_features_file, tmp_path):
    single = ["--question", "what color", "--features"]
    with pytest.raises(PredictionError, match=f"^model folder not found: {tmp_path / 'absent'}$"):
        run_main("--model", str(tmp_path / "absent"), *single, str(toy_features_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PredictionError, match=r"empty has no config.json; save one there with model.save_pretrained"):
        run_main("--model", str(empty), *single, str(toy_features_file))
    model_only = tmp_path / "model_only"
    RWSANForVQA.from_pretrained(toy_model_dir).save_pretrained(model_only)
    with pytest.raises(PredictionError, match=r"has no processor_config.json; save one there with processor"):
        run_main("--model", str(model_only), *single, str(toy_features_file))
    if not torch.cuda.is_available():
        with pytest.raises(PredictionError, match="^cannot use the device 'cuda': "):
            main(["--model", str(toy_model_dir), *single, str(toy_features_file), "--device", "cuda"])
    with pytest.raises(PredictionError, match="^cannot use the device 'tpu': "):
        main(["--model", str(toy_model_dir), *single, str(toy_features_file), "--device", "tpu"])
    # torch makes tensors there, without values: autocast then failed with a traceback.
    with pytest.raises(PredictionError, match="^cannot use the device 'meta': its tensors hold no values"):
        main(["--model", str(toy_model_dir), *single, str(toy_features_file), "--device", "meta"])
    if not torch.backends.mps.is_available():
        # One line, not torch's list of the backends it was built with.
        with pytest.raises(PredictionError, match="^cannot use the device 'mps': [^\n]*$"):
            main(["--model", str(toy_model_dir), *single, str(toy_features_file), "--device", "mps"])
    with pytest.raises(PredictionError, match=f"^features file not found: {tmp_path / 'absent.npz'}$"):
        run_main("--model", str(toy_model_dir), *single, str(tmp_path / "absent.npz"))
    with pytest.raises(PredictionError, match=f"^image file not found: {tmp_path / 'absent.jpg'}$"):
        run_main("--model", str(toy_model_dir), *single, str(toy_features_file), "--plot", str(tmp_path / "p.png"),
                 "--image", str(tmp_path / "absent.jpg"))  # fmt: skip
    not_an_image = tmp_path / "photo.jpg"
    not_an_image.write_text("not an image")
    with pytest.raises(PredictionError, match=f"^cannot read the image {not_an_image}: "):
        run_main("--model", str(toy_model_dir), *single, str(toy_features_file), "--plot", str(tmp_path / "p.png"),
                 "--image", str(not_an_image))  # fmt: skip
    with pytest.raises(PredictionError, match=f"^dataset folder not found: {tmp_path / 'absent'}$"):
        run_main("--model", str(toy_model_dir), "--dataset_dir", str(tmp_path / "absent"), "--output", "p.json")


def test_a_dataset_with_other_vocabularies_is_refused(toy_vqa, toy_model_dir, tmp_path):
    processor = RWSANProcessor.from_pretrained(toy_model_dir)
    processor.id2label = {index: f"{label}!" for index, label in processor.id2label.items()}
    save_for_pipeline(tiny_model_for(processor), processor, tmp_path)
    with pytest.raises(PredictionError, match=r"\(prepared\) has another answer vocabulary than the model.s$"):
        run_main("--model", str(tmp_path), "--dataset_dir", str(toy_vqa), "--output", str(tmp_path / "p.json"))


def test_a_dataset_of_another_feature_size_is_refused_before_answering(toy_vqa, toy_model_dir, tmp_path):
    """Else it failed in the model's first batch, with a message that named neither the data nor the model."""
    dataset_processor = RWSANProcessor.from_pretrained(toy_vqa / "processor")
    processor = RWSANProcessor(
        dataset_processor.tokenizer, dataset_processor.id2label, image_feature_size=TOY_FEATURE_SIZE + 8
    )
    save_for_pipeline(tiny_model_for(processor), processor, tmp_path)
    message = f"{toy_vqa} (prepared) holds {TOY_FEATURE_SIZE} features a region, but the model takes 32"
    with pytest.raises(PredictionError, match=f"^{re.escape(message)}$"):
        run_main("--model", str(tmp_path), "--dataset_dir", str(toy_vqa), "--output", str(tmp_path / "p.json"))


def test_predict_split_refuses_a_model_in_training_mode_and_bad_loader_sizes(toy_vqa, toy_model_dir):
    """A model left in training mode (just trained, say) answered through dropout, differently at every call."""
    model = RWSANForVQA.from_pretrained(toy_model_dir)
    processor = RWSANProcessor.from_pretrained(toy_model_dir)
    with pytest.raises(PredictionError, match=re.escape("the model is in training mode, where dropout makes the")):
        predict_module.predict_split(model.train(), processor, toy_vqa, "val")
    model.eval()
    with pytest.raises(ValueError, match="^batch_size must be a positive integer, got 0$"):
        predict_module.predict_split(model, processor, toy_vqa, "val", batch_size=0)
    with pytest.raises(ValueError, match="^num_workers must be an integer of at least 0, got -1$"):
        predict_module.predict_split(model, processor, toy_vqa, "val", num_workers=-1)


def test_a_processor_that_does_not_fit_the_model_beside_it_is_refused(toy_model_dir, toy_features_file, tmp_path):
    """Else a split's answers (named by the model) and one question's (named by the processor) would differ."""
    processor = RWSANProcessor.from_pretrained(toy_model_dir)
    model = RWSANForVQA.from_pretrained(toy_model_dir)
    model.save_pretrained(tmp_path)
    processor.id2label = {index: f"{label}!" for index, label in processor.id2label.items()}
    processor.save_pretrained(tmp_path)
    num_answers, first_answer = len(processor.id2label), model.config.id2label[0]
    message = (
        f"The answers of the model in {tmp_path} ({num_answers}) are not those of the processor beside it "
        f"({num_answers}): answer 0 is '{first_answer}' in the model but '{first_answer}!' in the processor"
    )
    with pytest.raises(PredictionError, match=f"^{re.escape(message)}"):
        run_main("--model", str(tmp_path), "--features", str(toy_features_file), "--question", "what color")


PLOT_FORMATS_MESSAGE = "--plot {}: the file name's extension gives the format, one matplotlib writes: "


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--question", "what"], "give either --features and --question, or --dataset_dir and --output"),
        (["--features", "f.npz"], "--features needs --question"),
        (["--features", "f.npz", "--question", "q", "--dataset_dir", "d"], "give either"),
        (["--dataset_dir", "d"], "--dataset_dir needs --output"),
        (
            ["--features", "f.npz", "--question", "q", "--image", "photo.jpg"],
            "--image is only used with --plot",
        ),
        # The photo would be replaced by the plot.
        (
            ["--features", "f.npz", "--question", "q", "--plot", "photo.png", "--image", "./photo.png"],
            "--plot photo.png is the --image file, which the plot would overwrite",
        ),
        (["--features", "f.npz", "--question", "q", "--top_k", "0"], "--top_k must be at least 1"),
        (["--dataset_dir", "d", "--output", "p.json", "--num_workers", "-1"], "--num_workers must be at least 0"),
        # matplotlib would write attention.png, and the name printed would not be the file's.
        (["--features", "f.npz", "--question", "q", "--plot", "attention"], PLOT_FORMATS_MESSAGE.format("attention")),
        # else refused by matplotlib once the question is answered
        (["--features", "f.npz", "--question", "q", "--plot", "a.xyz"], PLOT_FORMATS_MESSAGE.format("a.xyz")),
        # options of the other mode would be ignored
        (["--dataset_dir", "d", "--output", "p.json", "--question", "q"], "--question is not used with --dataset_dir"),
        (["--dataset_dir", "d", "--output", "p.json", "--top_k", "3"], "--top_k is not used with --dataset_dir"),
        (["--features", "f.npz", "--question", "q", "--output", "p.json"], "--output is not used with --features"),
        (["--features", "f.npz", "--question", "q", "--split", "val"], "--split is not used with --features"),
    ],
)
def test_bad_arguments_are_refused(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_module_reports_errors_without_a_traceback(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "rwsan.predict", "--model", str(tmp_path / "absent"), "--features", "f.npz",
         "--question", "what color"],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 1
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line == f"error: model folder not found: {tmp_path / 'absent'}"
    assert "Traceback" not in completed.stderr
