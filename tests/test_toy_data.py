"""Tests of data_scripts/make_toy_vqa.py: the official VQA-v2 / RWSAN-release files and layouts, determinism,
answers that follow from the scene, and a question-only baseline far below an image-aware one."""

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_scripts.make_toy_vqa import main, make_toy_vqa, split_sizes

FEATURE_SIZE = 32
NUM_IMAGES = 40
ORIGINAL_ANSWER_DICT = Path(__file__).resolve().parents[1] / ".." / "shared" / "rwsan-original" / "answer_dict.json"

QUESTION_FILES = {
    "train2014": "v2_OpenEnded_mscoco_train2014_questions.json",
    "val2014": "v2_OpenEnded_mscoco_val2014_questions.json",
    "test2015": "v2_OpenEnded_mscoco_test2015_questions.json",
    "test-dev2015": "v2_OpenEnded_mscoco_test-dev2015_questions.json",
}
ANNOTATION_FILES = {
    "train2014": "v2_mscoco_train2014_annotations.json",
    "val2014": "v2_mscoco_val2014_annotations.json",
}
FEATURE_SPLITS = ("train2014", "val2014", "test2015")

# The toy world, written out independently of the generator.
ATTRIBUTE_WORDS = {
    "color": {"red", "blue", "green", "yellow", "purple", "gray"},
    "size": {"small", "large"},
    "material": {"rubber", "metal"},
}
SHAPE_NOUNS = {
    "ball": "ball", "balls": "ball", "box": "box", "boxes": "box", "cylinder": "cylinder", "cylinders": "cylinder",
    "cone": "cone", "cones": "cone", "object": None, "objects": None,
}  # fmt: skip
ATTRIBUTES = {**ATTRIBUTE_WORDS, "shape": {"ball", "box", "cylinder", "cone"}}
QUESTION_FORMS = (
    (re.compile(r"Is there a (.+)\?"), "exists", None),
    (re.compile(r"Are there any (.+)\?"), "exists", None),
    (re.compile(r"How many (.+) are there\?"), "count", None),
    (re.compile(r"How many (.+) are in the picture\?"), "count", None),
    (re.compile(r"What color is the (.+)\?"), "query", "color"),
    (re.compile(r"What shape is the (.+)\?"), "query", "shape"),
    (re.compile(r"What is the (.+) made of\?"), "query", "material"),
    (re.compile(r"What size is the (.+)\?"), "query", "size"),
)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def original_words(question: str) -> list[str]:
    """The original RWSAN word split (data/load_data.py)."""
    return re.sub(r"([.,'!?\"()*#:;])", "", question.lower()).replace("-", " ").replace("/", " ").split()


def parse_description(phrase: str) -> dict[str, str]:
    *adjectives, noun = phrase.split()
    description = {}
    for word in adjectives:
        (name,) = [name for name, words in ATTRIBUTE_WORDS.items() if word in words]
        description[name] = word
    if SHAPE_NOUNS[noun] is not None:
        description["shape"] = SHAPE_NOUNS[noun]
    return description


def answer_from_scene(question: str, objects: list[dict]) -> str:
    """Answers a toy question by reading the objects of its scene."""
    for pattern, kind, queried in QUESTION_FORMS:
        match = pattern.fullmatch(question)
        if match is None:
            continue
        description = parse_description(match.group(1))
        matching = [obj for obj in objects if all(obj[name] == value for name, value in description.items())]
        if kind == "exists":
            return "yes" if matching else "no"
        if kind == "count":
            return str(len(matching))
        assert len(matching) == 1, f"{question!r} does not single out one object"
        return matching[0][queried]
    raise AssertionError(f"unexpected question form: {question!r}")


def vqa_accuracy(prediction: str, annotation: dict) -> float:
    return min(1.0, sum(entry["answer"] == prediction for entry in annotation["answers"]) / 3)


def region_features(data_dir: Path, scene: dict) -> np.ndarray:
    name = f"COCO_{scene['split']}_{scene['image_id']:012d}.jpg.npz"
    with np.load(data_dir / "coco_extract" / scene["split"] / name) as features:
        return features["x"].T


def attribute_targets(regions: list[dict]) -> np.ndarray:
    """One-hot kind and attributes per region (attributes all zero for background regions)."""
    columns = [("kind", "object")] + [(name, value) for name, values in ATTRIBUTES.items() for value in sorted(values)]
    return np.array(
        [[float(region.get(name, region["kind"]) == value) for name, value in columns] for region in regions]
    )


def decode_regions(probe: np.ndarray, features: np.ndarray) -> list[dict]:
    """Reads the objects of a scene back from its region features with a linear probe."""
    scores = features @ probe
    objects = []
    for region_scores in scores:
        if region_scores[0] < 0.5:
            continue
        decoded, start = {}, 1
        for name, values in ATTRIBUTES.items():
            ordered = sorted(values)
            decoded[name] = ordered[int(np.argmax(region_scores[start : start + len(ordered)]))]
            start += len(ordered)
        objects.append(decoded)
    return objects


def fit_probe(data_dir: Path, scenes: list[dict]) -> np.ndarray:
    features = np.concatenate([region_features(data_dir, scene) for scene in scenes])
    targets = np.concatenate([attribute_targets(scene["regions"]) for scene in scenes])
    return np.linalg.lstsq(features, targets, rcond=None)[0]


def annotated_questions(data_dir: Path, split: str) -> list[tuple[str, dict]]:
    questions = load_json(data_dir / "vqa" / QUESTION_FILES[split])["questions"]
    annotations = load_json(data_dir / "vqa" / ANNOTATION_FILES[split])["annotations"]
    return [(question["question"], annotation) for question, annotation in zip(questions, annotations)]


def scenes_by_split(data_dir: Path) -> dict[str, list[dict]]:
    scenes = defaultdict(list)
    for scene in load_json(data_dir / "toy_scenes.json")["scenes"]:
        scenes[scene["split"]].append(scene)
    return scenes


def objects_of(scene: dict) -> list[dict]:
    return [region for region in scene["regions"] if region["kind"] == "object"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return make_toy_vqa(
        tmp_path_factory.mktemp("toy") / "datasets", seed=0, num_images=NUM_IMAGES, feature_size=FEATURE_SIZE
    )


@pytest.fixture(scope="module")
def large_toy_dir(tmp_path_factory) -> Path:
    return make_toy_vqa(
        tmp_path_factory.mktemp("toy_large") / "datasets", seed=0, num_images=400, feature_size=FEATURE_SIZE
    )


def test_split_sizes_are_70_15_15():
    assert split_sizes(40) == {"train2014": 28, "val2014": 6, "test2015": 6}
    assert split_sizes(2000) == {"train2014": 1400, "val2014": 300, "test2015": 300}
    assert split_sizes(10) == {"train2014": 6, "val2014": 2, "test2015": 2}


def test_writes_the_official_file_names(toy_dir):
    assert sorted(path.name for path in (toy_dir / "vqa").iterdir()) == sorted(
        list(QUESTION_FILES.values()) + list(ANNOTATION_FILES.values())
    )
    for split, size in split_sizes(NUM_IMAGES).items():
        names = [path.name for path in (toy_dir / "coco_extract" / split).iterdir()]
        assert len(names) == size
        assert all(re.fullmatch(rf"COCO_{split}_\d{{12}}\.jpg\.npz", name) for name in names)


def test_question_files_follow_the_vqa_v2_schema(toy_dir):
    for split, file_name in QUESTION_FILES.items():
        content = load_json(toy_dir / "vqa" / file_name)
        assert list(content) == ["info", "task_type", "data_type", "license", "data_subtype", "questions"]
        assert (content["task_type"], content["data_type"], content["data_subtype"]) == ("Open-Ended", "mscoco", split)
        assert set(content["info"]) == {"description", "url", "version", "year", "contributor", "date_created"}
        assert set(content["license"]) == {"url", "name"}
        for question in content["questions"]:
            assert list(question) == ["image_id", "question", "question_id"]
            assert isinstance(question["image_id"], int) and isinstance(question["question_id"], int)


def test_annotation_files_follow_the_vqa_v2_schema(toy_dir):
    for split, file_name in ANNOTATION_FILES.items():
        content = load_json(toy_dir / "vqa" / file_name)
        assert list(content) == ["info", "license", "data_type", "data_subtype", "annotations"]
        assert content["data_subtype"] == split
        questions = load_json(toy_dir / "vqa" / QUESTION_FILES[split])["questions"]
        assert [(a["question_id"], a["image_id"]) for a in content["annotations"]] == [
            (q["question_id"], q["image_id"]) for q in questions
        ]
        for annotation in content["annotations"]:
            assert list(annotation) == [
                "question_type",
                "multiple_choice_answer",
                "answers",
                "image_id",
                "answer_type",
                "question_id",
            ]
            assert annotation["answer_type"] in ("yes/no", "number", "other")
            assert annotation["question_type"] in (
                "is there a",
                "are there any",
                "how many",
                "what color is the",
                "what is the",
                "what",
            )
            assert [entry["answer_id"] for entry in annotation["answers"]] == list(range(1, 11))
            assert all(list(entry) == ["answer", "answer_confidence", "answer_id"] for entry in annotation["answers"])
            assert {entry["answer_confidence"] for entry in annotation["answers"]} <= {"yes", "maybe", "no"}
            answer_counts = Counter(entry["answer"] for entry in annotation["answers"])
            assert annotation["multiple_choice_answer"] == answer_counts.most_common(1)[0][0]


def test_question_ids_are_image_id_times_1000_plus_index(toy_dir):
    image_ids_per_split = {}
    for split in FEATURE_SPLITS:
        questions = load_json(toy_dir / "vqa" / QUESTION_FILES[split])["questions"]
        indices = defaultdict(list)
        for question in questions:
            assert question["question_id"] // 1000 == question["image_id"]
            indices[question["image_id"]].append(question["question_id"] % 1000)
        assert all(found == [0, 1, 2, 3, 4] for found in indices.values())
        feature_ids = {int(path.name[-20:-8]) for path in (toy_dir / "coco_extract" / split).iterdir()}
        assert set(indices) == feature_ids
        image_ids_per_split[split] = feature_ids
    train, val, test = image_ids_per_split.values()
    assert not (train & val or train & test or val & test)


def test_test_dev_is_a_subset_of_test(toy_dir):
    test = load_json(toy_dir / "vqa" / QUESTION_FILES["test2015"])["questions"]
    test_dev = load_json(toy_dir / "vqa" / QUESTION_FILES["test-dev2015"])["questions"]
    test_dev_images = {question["image_id"] for question in test_dev}
    assert test_dev == [question for question in test if question["image_id"] in test_dev_images]
    assert len(test_dev_images) == 3  # half of the 6 test images


def test_feature_files_have_the_original_layout(toy_dir):
    for scene in load_json(toy_dir / "toy_scenes.json")["scenes"]:
        name = f"COCO_{scene['split']}_{scene['image_id']:012d}.jpg.npz"
        with np.load(toy_dir / "coco_extract" / scene["split"] / name) as features:
            assert sorted(features.files) == ["bbox", "image_h", "image_w", "num_bbox", "x"]
            num_regions = len(scene["regions"])
            assert 4 <= num_regions <= 13
            assert features["x"].dtype == np.float32 and features["x"].shape == (FEATURE_SIZE, num_regions)
            assert features["bbox"].dtype == np.float32 and features["bbox"].shape == (num_regions, 4)
            assert int(features["num_bbox"]) == num_regions
            assert (int(features["image_w"]), int(features["image_h"])) == (scene["image_w"], scene["image_h"])
            boxes = features["bbox"]
            np.testing.assert_array_equal(boxes, np.array([r["bbox"] for r in scene["regions"]], np.float32))
            assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, :2] < boxes[:, 2:])
            assert np.all(boxes[:, 2] < scene["image_w"]) and np.all(boxes[:, 3] < scene["image_h"])


@pytest.mark.parametrize("feature_size", [256, 2048])
def test_feature_norms_do_not_grow_with_the_feature_size(tmp_path, feature_size):
    # Each code slot is a unit-length direction and the noise vector has length `feature_noise` (0.5), so a
    # region's squared norm is about |code|^2 + 0.25 at any size. Unit-variance values (norms ~sqrt(size)) made
    # the model memorise the toy images instead of reading them.
    data_dir = make_toy_vqa(tmp_path, seed=0, num_images=20, feature_size=feature_size)
    feature_norms, expected_norms = [], []
    for scene in load_json(data_dir / "toy_scenes.json")["scenes"]:
        feature_norms += list(np.sum(region_features(data_dir, scene) ** 2, axis=1))
        for region in scene["regions"]:
            x1, y1, x2, y2 = region["bbox"]
            centre = ((x1 + x2) / scene["image_w"] - 1) ** 2 + ((y1 + y2) / scene["image_h"] - 1) ** 2
            one_hot_slots = 5 if region["kind"] == "object" else 1
            expected_norms.append(one_hot_slots + centre + 0.25)
    assert np.mean(feature_norms) == pytest.approx(np.mean(expected_norms), rel=0.1)


def test_same_seed_gives_identical_files_and_another_seed_does_not(toy_dir, tmp_path):
    again = make_toy_vqa(tmp_path / "again", seed=0, num_images=NUM_IMAGES, feature_size=FEATURE_SIZE, num_proc=2)
    other = make_toy_vqa(tmp_path / "other", seed=1, num_images=NUM_IMAGES, feature_size=FEATURE_SIZE)
    json_files = sorted(path.relative_to(toy_dir) for path in toy_dir.rglob("*.json"))
    assert len(json_files) == 7
    for path in json_files:
        assert (again / path).read_bytes() == (toy_dir / path).read_bytes()
        assert (other / path).read_bytes() != (toy_dir / path).read_bytes()
    feature_files = sorted(path.relative_to(toy_dir) for path in toy_dir.rglob("*.npz"))
    assert sorted(path.relative_to(again) for path in again.rglob("*.npz")) == feature_files
    for path in feature_files:
        with np.load(toy_dir / path) as expected, np.load(again / path) as written:
            for key in expected.files:
                np.testing.assert_array_equal(written[key], expected[key])
    assert sorted(path.relative_to(other) for path in other.rglob("*.npz")) != feature_files


def test_answers_follow_from_the_scene(toy_dir):
    scenes = {scene["image_id"]: scene for scene in load_json(toy_dir / "toy_scenes.json")["scenes"]}
    num_true_annotator_answers = num_annotator_answers = 0
    for split in ANNOTATION_FILES:
        for question, annotation in annotated_questions(toy_dir, split):
            truth = answer_from_scene(question, objects_of(scenes[annotation["image_id"]]))
            assert annotation["multiple_choice_answer"] == truth, question
            num_true_annotator_answers += sum(entry["answer"] == truth for entry in annotation["answers"])
            num_annotator_answers += len(annotation["answers"])
    assert 0.85 <= num_true_annotator_answers / num_annotator_answers <= 0.95


def test_a_hand_checked_scene():
    objects = [
        {"shape": "ball", "color": "red", "size": "large", "material": "metal"},
        {"shape": "ball", "color": "blue", "size": "small", "material": "rubber"},
        {"shape": "cone", "color": "red", "size": "small", "material": "rubber"},
    ]
    assert answer_from_scene("How many red objects are there?", objects) == "2"
    assert answer_from_scene("Is there a red ball?", objects) == "yes"
    assert answer_from_scene("Are there any metal cones?", objects) == "no"
    assert answer_from_scene("What color is the small ball?", objects) == "blue"
    assert answer_from_scene("What is the cone made of?", objects) == "rubber"


def test_at_most_four_annotators_err_so_the_true_answer_is_the_majority(tmp_path):
    """However inaccurate the annotators, six of the ten or more give the true answer: `multiple_choice_answer` is
    the scene's answer (five against five would tie it with a wrong one)."""
    data_dir = make_toy_vqa(tmp_path, num_images=10, feature_size=FEATURE_SIZE, annotator_accuracy=0.1)
    scenes = {scene["image_id"]: scene for scene in load_json(data_dir / "toy_scenes.json")["scenes"]}
    for split in ANNOTATION_FILES:
        for question, annotation in annotated_questions(data_dir, split):
            truth = answer_from_scene(question, objects_of(scenes[annotation["image_id"]]))
            assert [entry["answer"] for entry in annotation["answers"]].count(truth) >= 6, question
            assert annotation["multiple_choice_answer"] == truth


def test_every_image_gets_an_id_of_its_own_however_few_are_left(tmp_path, monkeypatch):
    """Drawn with replacement, the default set's 2,000 ids out of a million would most likely repeat one: two images
    under one feature file name, and their questions under the same ids."""
    import data_scripts.make_toy_vqa as make_toy_vqa_module

    monkeypatch.setattr(make_toy_vqa_module, "MAX_IMAGE_ID", 12)
    make_toy_vqa(tmp_path, num_images=12, feature_size=FEATURE_SIZE, questions_per_image=1)
    scenes = load_json(tmp_path / "toy_scenes.json")["scenes"]
    assert sorted(scene["image_id"] for scene in scenes) == list(range(1, 13))
    assert sum(1 for _ in (tmp_path / "coco_extract").rglob("*.npz")) == 12


def test_yes_no_answers_are_balanced(large_toy_dir):
    yes_no = [
        annotation["multiple_choice_answer"]
        for split in ANNOTATION_FILES
        for _, annotation in annotated_questions(large_toy_dir, split)
        if annotation["answer_type"] == "yes/no"
    ]
    assert 0.45 <= yes_no.count("yes") / len(yes_no) <= 0.55


def test_question_only_baseline_is_far_below_an_image_aware_one(large_toy_dir):
    scenes = scenes_by_split(large_toy_dir)
    train, val = annotated_questions(large_toy_dir, "train2014"), annotated_questions(large_toy_dir, "val2014")

    # The best a model blind to the image can do: the most common answer of the same question (or, for a
    # question never seen in training, of its question type).
    answers_per_question, answers_per_type = defaultdict(Counter), defaultdict(Counter)
    for question, annotation in train:
        answers_per_question[question][annotation["multiple_choice_answer"]] += 1
        answers_per_type[annotation["question_type"]][annotation["multiple_choice_answer"]] += 1

    def question_only_answer(question, annotation):
        counts = answers_per_question.get(question) or answers_per_type[annotation["question_type"]]
        return counts.most_common(1)[0][0]

    question_only = np.mean([vqa_accuracy(question_only_answer(q, a), a) for q, a in val])

    # An image-aware model: a linear probe reads the objects from the val features, then answers from them.
    probe = fit_probe(large_toy_dir, scenes["train2014"])
    decoded = {
        scene["image_id"]: decode_regions(probe, region_features(large_toy_dir, scene)) for scene in scenes["val2014"]
    }
    image_aware = np.mean([vqa_accuracy(answer_from_scene(q, decoded[a["image_id"]]), a) for q, a in val])

    assert question_only < 0.55
    assert image_aware > 0.98


def test_answers_are_in_the_original_answer_vocabulary(toy_dir):
    if not ORIGINAL_ANSWER_DICT.exists():
        pytest.skip(f"{ORIGINAL_ANSWER_DICT} not found")
    answer_to_index = load_json(ORIGINAL_ANSWER_DICT)[0]
    answers = {
        entry["answer"]
        for split in ANNOTATION_FILES
        for _, annotation in annotated_questions(toy_dir, split)
        for entry in annotation["answers"]
    }
    assert answers <= set(answer_to_index)


def test_questions_split_into_clean_words(toy_dir):
    for file_name in QUESTION_FILES.values():
        for question in load_json(toy_dir / "vqa" / file_name)["questions"]:
            assert re.fullmatch(r"[A-Z][a-z ]+\?", question["question"])
            assert original_words(question["question"]) == question["question"].lower()[:-1].split()


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"num_images": 9}, "num_images must be between 10 and 999999 so that every split gets images, got 9"),
        ({"feature_size": 8}, "feature_size must be at least 18"),
        ({"questions_per_image": 0}, "questions_per_image must be between 1 and 20, got 0"),
        ({"num_proc": 0}, "num_proc must be at least 1, got 0"),
        ({"seed": -1}, "seed must be non-negative, got -1"),
        ({"annotator_accuracy": 0.0}, r"annotator_accuracy must be in \(0, 1\], got 0.0"),
        ({"feature_noise": -0.5}, "feature_noise must be finite and non-negative, got -0.5"),
        ({"feature_noise": float("nan")}, "feature_noise must be finite and non-negative, got nan"),
    ],
)
def test_rejects_bad_arguments(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        make_toy_vqa(tmp_path / "toy", **arguments)
    assert not (tmp_path / "toy").exists()


def test_refuses_a_non_empty_output_dir_unless_overwrite(tmp_path):
    make_toy_vqa(tmp_path, num_images=10, feature_size=FEATURE_SIZE)
    stale_features = tmp_path / "coco_extract" / "train2014" / "COCO_train2014_000000000001.jpg.npz"
    stale_features.write_bytes(b"")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("kept")
    with pytest.raises(FileExistsError, match=re.escape(f"output_dir {tmp_path} is not empty; pass overwrite=True")):
        make_toy_vqa(tmp_path, num_images=10, feature_size=FEATURE_SIZE)

    make_toy_vqa(tmp_path, num_images=10, feature_size=FEATURE_SIZE, overwrite=True)
    assert not stale_features.exists()
    assert unrelated.read_text() == "kept"
    assert len(list((tmp_path / "coco_extract" / "train2014").iterdir())) == 6


def test_an_interrupted_set_does_not_look_finished_and_can_be_overwritten(tmp_path, monkeypatch):
    import data_scripts.make_toy_vqa as make_toy_vqa_module

    write_region_features = make_toy_vqa_module.write_region_features
    written = []

    def write_then_stop(task):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(write_region_features(task))

    monkeypatch.setattr(make_toy_vqa_module, "write_region_features", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        make_toy_vqa(tmp_path, num_images=10, feature_size=FEATURE_SIZE)
    assert not (tmp_path / "toy_scenes.json").exists()
    assert (tmp_path / "toy_vqa.unfinished").is_file()

    monkeypatch.undo()
    make_toy_vqa(tmp_path, num_images=10, feature_size=FEATURE_SIZE, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["coco_extract", "toy_scenes.json", "vqa"]
    assert sum(1 for _ in (tmp_path / "coco_extract").rglob("*.npz")) == 10


@pytest.mark.parametrize("real_folder", ["vqa", "coco_extract", "processor"])  # processor/: a prepared set
def test_overwrite_never_deletes_data_it_did_not_make(tmp_path, real_folder):
    real_file = tmp_path / real_folder / "train2014" / "real_data.json"
    real_file.parent.mkdir(parents=True)
    real_file.write_text("[]")
    message = (
        f"output_dir {tmp_path} holds {real_folder}/ but no toy_scenes.json or toy_vqa.unfinished: it is not a toy set "
        "this script made"
    )
    with pytest.raises(FileExistsError, match=re.escape(message)):
        make_toy_vqa(tmp_path, num_images=10, feature_size=FEATURE_SIZE, overwrite=True)
    assert real_file.read_text() == "[]"
    assert sorted(path.name for path in tmp_path.iterdir()) == [real_folder]


def test_overwrite_names_five_of_the_files_it_refuses_to_delete(tmp_path):
    """Pointed at a feature folder, the message listed all its files: tens of thousands of names."""
    for index in range(8):
        (tmp_path / f"COCO_{index}.jpg.npz").write_bytes(b"")
    message = (
        f"output_dir {tmp_path} holds COCO_0.jpg.npz, COCO_1.jpg.npz, COCO_2.jpg.npz, COCO_3.jpg.npz, COCO_4.jpg.npz "
        "and 3 more but no toy_scenes.json"
    )
    with pytest.raises(FileExistsError, match=re.escape(message)):
        make_toy_vqa(tmp_path, num_images=10, feature_size=FEATURE_SIZE, overwrite=True)
    assert len(list(tmp_path.iterdir())) == 8


def test_refuses_an_output_path_that_is_a_file(tmp_path):
    (tmp_path / "toy").write_text("")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        make_toy_vqa(tmp_path / "toy")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--num_images", "5"], "num_images must be between 10 and"),
        (["--output_dir", "{existing}"], "is not empty"),
        (["--annotator_accuracy", "1.5"], "annotator_accuracy must be in (0, 1], got 1.5"),
        (["--feature_noise", "inf"], "feature_noise must be finite and non-negative, got inf"),
    ],
)
def test_command_line_refuses_bad_options_without_a_traceback(toy_dir, arguments, message, capsys):
    arguments = [argument.format(existing=toy_dir) for argument in arguments]
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(toy_dir.parent / "new"), *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert ": error: " in error and message in error


def test_command_line_writes_the_same_data_set(toy_dir, tmp_path, capsys):
    main(["--output_dir", str(tmp_path / "cli"), "--num_images", str(NUM_IMAGES), "--feature_size", "32"])
    assert "Wrote 40 images and 200 questions" in capsys.readouterr().out
    for split, file_name in ANNOTATION_FILES.items():
        written = (tmp_path / "cli" / "vqa" / file_name).read_bytes()
        assert written == (toy_dir / "vqa" / file_name).read_bytes(), split


def test_command_line_overwrite_replaces_the_toy_set(tmp_path):
    arguments = ["--output_dir", str(tmp_path), "--num_images", "10", "--feature_size", "32"]
    main(arguments)
    main([*arguments, "--seed", "1", "--overwrite"])
    assert load_json(tmp_path / "toy_scenes.json")["seed"] == 1


def test_command_line_sets_the_annotators_and_the_feature_noise(tmp_path):
    """Annotators who never err all give the true answer (the default's err now and then); without noise, each
    region's feature lies the default noise's length (0.5) from that of the defaults' set of the same seed."""
    arguments = ["--num_images", "10", "--feature_size", "64"]
    main(["--output_dir", str(tmp_path / "exact"), *arguments, "--annotator_accuracy", "1"])
    main(["--output_dir", str(tmp_path / "clean"), *arguments, "--feature_noise", "0"])
    default = make_toy_vqa(tmp_path / "default", seed=0, num_images=10, feature_size=64)

    def distinct_answers(data_dir):
        return [{answer["answer"] for answer in annotation["answers"]}
                for _, annotation in annotated_questions(data_dir, "train2014")]  # fmt: skip

    assert all(len(answers) == 1 for answers in distinct_answers(tmp_path / "exact"))
    assert any(len(answers) > 1 for answers in distinct_answers(default))
    squared_distances = [
        np.sum((region_features(tmp_path / "clean", scene) - region_features(default, scene)) ** 2, axis=1)
        for scene in load_json(default / "toy_scenes.json")["scenes"]
    ]
    assert np.mean(np.concatenate(squared_distances)) == pytest.approx(0.5**2, rel=0.15)
