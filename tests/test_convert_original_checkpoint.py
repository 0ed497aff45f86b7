"""The converter of original checkpoints: key map, size inference, and its refusals."""

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from rwsan import RWSANConfig, RWSANForVQA
from rwsan.convert_original_checkpoint import (
    CheckpointError,
    convert,
    load_original_checkpoint,
    main,
    rename_original_key,
)

ORIGINAL = Path(__file__).resolve().parents[2] / "shared" / "rwsan-original"


def read_original_layout() -> dict[str, tuple[int, ...]]:
    path = ORIGINAL / "paper_config_state_dict.txt"
    if not path.exists():
        pytest.skip("../shared/rwsan-original is not beside the repository")
    layout = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            layout[key] = tuple(int(size) for size in re.findall(r"\d+", shape))
    return layout


@pytest.fixture(scope="module")
def golden():
    path = ORIGINAL / "golden_small.pt"
    if not path.exists():
        pytest.skip("../shared/rwsan-original is not beside the repository")
    return torch.load(path, weights_only=True)


def save_checkpoint(path: Path, state_dict: dict) -> Path:
    torch.save({"state_dict": state_dict, "optimizer": {}, "lr_base": 1e-4}, path)
    return path


def write_answer_dict(path: Path, answers: list[str]) -> Path:
    """An answer dictionary in the original's `[ans_to_ix, ix_to_ans]` format."""
    path.write_text(json.dumps([{a: i for i, a in enumerate(answers)}, {str(i): a for i, a in enumerate(answers)}]))
    return path


def test_every_original_key_maps_onto_the_paper_model_with_its_shape():
    layout = read_original_layout()
    model = RWSANForVQA(RWSANConfig(vocab_size=20573, num_labels=3129))
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    renamed = {rename_original_key(key): shape for key, shape in layout.items()}
    assert renamed == expected
    assert sum(torch.Size(shape).numel() for shape in layout.values()) == 19_540_439


def test_answer_dict_names_the_answers(tmp_path, golden):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    answers = [f"answer-{i}" for i in range(golden["answer_size"])]
    answer_dict = write_answer_dict(tmp_path / "answer_dict.json", answers)
    model = load_original_checkpoint(checkpoint, answer_dict)
    assert model.config.id2label[3] == "answer-3" and model.config.label2id["answer-7"] == 7


def test_paper_answer_dict_is_read(tmp_path):
    read_original_layout()  # skips without the shared folder
    state_dict = {key: torch.zeros(shape) for key, shape in read_original_layout().items()}
    checkpoint = save_checkpoint(tmp_path / "paper.pkl", state_dict)
    model = load_original_checkpoint(checkpoint, ORIGINAL / "answer_dict.json")
    assert model.num_parameters() == 19_540_439
    assert model.config.num_labels == 3129 and model.config.id2label[3] == "yes"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda sd: sd.pop("proj_norm.a_2"), r"missing keys .*rwsan\.fusion_norm\.weight"),
        (
            lambda sd: sd.__setitem__("RWSA_layer.extra.weight", torch.zeros(2)),
            r"unexpected keys: \['RWSA_layer\.extra\.weight'\]",
        ),
        (
            lambda sd: sd.__setitem__("attflat_lang.linear_merge.bias", torch.zeros(7)),
            r"mis-shaped keys: \['attflat_lang\.linear_merge\.bias \(7,\) \(expected \(128,\)\)'\]",
        ),
        (lambda sd: sd.pop("embedding.weight"), r"lacks the key 'embedding\.weight'"),
        # One of the two was silently kept.
        (
            lambda sd: sd.__setitem__("module.proj.weight", torch.zeros_like(sd["proj.weight"])),
            r"holds one weight under several keys, which would leave one of them: "
            r"\[\['proj\.weight', 'module\.proj\.weight'\]\]",
        ),
        (
            lambda sd: sd.__setitem__("proj_norm.weight", sd["proj_norm.a_2"]),
            r"\[\['proj_norm\.a_2', 'proj_norm\.weight'\]\]",
        ),
    ],
)
def test_bad_keys_are_named_and_nothing_is_written(tmp_path, golden, damage, message):
    state_dict = dict(golden["state_dict"])
    damage(state_dict)
    checkpoint = save_checkpoint(tmp_path / "bad.pkl", state_dict)
    with pytest.raises(CheckpointError, match=message):
        convert(str(checkpoint), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["bad.pkl"]


def test_corrupted_file_is_refused_with_a_clear_message(tmp_path, golden, capsys):
    good = save_checkpoint(tmp_path / "good.pkl", golden["state_dict"])
    corrupted = tmp_path / "corrupted.pkl"
    corrupted.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(corrupted), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "corrupted.pkl could not be read as a PyTorch checkpoint of tensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pickled_code_is_not_run(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(CheckpointError) as raised:
        load_original_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    # Not torch's advice to load it with weights_only=False, which would run the code.
    message = str(raised.value)
    assert message.startswith(f"{path} could not be read as a PyTorch checkpoint of tensors (it is no pickle of")
    assert "weights_only" not in message


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pkl"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a dict with a 'state_dict' of tensors"):
        load_original_checkpoint(path)
    with pytest.raises(CheckpointError, match="Checkpoint file not found"):
        load_original_checkpoint(tmp_path / "absent.pkl")


def test_the_loaded_model_answers_as_the_original_without_dropout(tmp_path, golden):
    """`load_original_checkpoint` hands back a model ready to answer: in eval mode, it gives the original's logits
    every time (in training mode dropout would make them random)."""
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    model = load_original_checkpoint(checkpoint)
    assert not model.training
    with torch.no_grad():
        logits = model(input_ids=golden["ques_ix"], image_features=golden["img_feat"]).logits
    torch.testing.assert_close(logits, golden["logits"], atol=1e-5, rtol=0)


def test_a_conversion_that_fails_while_saving_leaves_nothing_behind(tmp_path, golden, monkeypatch):
    """The folder is written under another name and renamed when whole: a failure removes that too."""
    import rwsan.convert_original_checkpoint as converter
    from rwsan.processing_rwsan import RWSANProcessor, build_question_tokenizer

    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    vocab = {"PAD": 0, "UNK": 1, **{f"word{i}": i for i in range(2, golden["token_size"])}}
    id2label = {index: f"LABEL_{index}" for index in range(golden["answer_size"])}
    RWSANProcessor(build_question_tokenizer(vocab), id2label=id2label, image_feature_size=48).save_pretrained(
        tmp_path / "processor"
    )

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(converter, "write_model_card", full_disk)
    (tmp_path / "models").mkdir()
    with pytest.raises(OSError, match="No space left on device"):
        convert(str(checkpoint), str(tmp_path / "models" / "rwsan"), processor=str(tmp_path / "processor"))
    assert list((tmp_path / "models").iterdir()) == []


def test_the_converted_folder_gets_the_permissions_the_umask_gives(tmp_path, golden):
    """Staged in a private temporary folder, the model came out readable by its owner alone (0700 whatever the
    umask): others on a shared server could not load it."""
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    given = os.umask(0o022)
    try:
        convert(str(checkpoint), str(tmp_path / "rwsan"))
    finally:
        os.umask(given)
    assert stat.S_IMODE((tmp_path / "rwsan").stat().st_mode) == 0o755
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_the_converted_config_takes_the_processors_question_and_region_cuts(tmp_path, golden):
    """The weights do not say how many words and regions the model was trained on; the processor given does, and
    the saved config (read by train_vqa.py to cut the data as the model was trained) must agree with it."""
    from rwsan.processing_rwsan import RWSANProcessor, build_question_tokenizer

    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    vocab = {"PAD": 0, "UNK": 1, **{f"word{i}": i for i in range(2, golden["token_size"])}}
    id2label = {index: f"LABEL_{index}" for index in range(golden["answer_size"])}
    processor = RWSANProcessor(
        build_question_tokenizer(vocab), id2label=id2label, image_feature_size=48, max_question_length=8,
        max_regions=36,
    )  # fmt: skip
    processor.save_pretrained(tmp_path / "processor")
    model = convert(str(checkpoint), str(tmp_path / "out"), processor=str(tmp_path / "processor"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["max_question_length"], config["max_regions"]) == (8, 36)
    assert (model.config.max_question_length, model.config.max_regions) == (8, 36)


def test_existing_output_folder_is_refused(tmp_path, golden):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        convert(str(checkpoint), str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_repeat_counts_given_on_the_command_line_are_the_models(tmp_path, golden):
    """The weights cannot tell how often the original applied its shared blocks: the counts given are saved and
    used (the golden logits are those of the paper's 3 and 3)."""
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    main(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")])
    main(
        ["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "other")]
        + ["--num_srwsa_repeats", "2", "--num_sgrwsa_repeats", "1"]
    )
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    assert (config["num_srwsa_repeats"], config["num_sgrwsa_repeats"]) == (2, 1)
    logits = {}
    for name in ("out", "other"):
        model = RWSANForVQA.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=golden["ques_ix"], image_features=golden["img_feat"]).logits
    torch.testing.assert_close(logits["out"], golden["logits"], atol=1e-5, rtol=0)
    assert (logits["other"] - golden["logits"]).abs().max() > 1e-2


def test_a_misspelt_configuration_override_is_refused(tmp_path, golden):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    with pytest.raises(TypeError, match=r"\['num_srwsa_repeat'\] are not RWSANConfig fields"):
        load_original_checkpoint(checkpoint, num_srwsa_repeat=2)
    model = load_original_checkpoint(checkpoint, num_srwsa_repeats=2, layer_norm_eps=1e-5)
    assert (model.config.num_srwsa_repeats, model.config.layer_norm_eps) == (2, 1e-5)


def test_answers_given_as_id2label_must_be_one_for_each_classifier_output(tmp_path, golden):
    """Else the config would name the answers LABEL_i."""
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    outputs = golden["state_dict"]["proj.weight"].shape[0]
    too_few = {index: f"answer {index}" for index in range(outputs - 1)}
    message = f"the classifier has {outputs} outputs but id2label names {outputs - 1} answers"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_original_checkpoint(checkpoint, id2label=too_few)
    answers = {**too_few, outputs - 1: "last"}
    assert load_original_checkpoint(checkpoint, id2label=answers).config.id2label == answers


def test_answer_dict_whose_two_halves_disagree_is_refused(tmp_path, golden):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    answer_dict = tmp_path / "answers.json"
    answer_dict.write_text(json.dumps([{"yes": 0, "no": 1}, {"0": "no", "1": "yes"}]))
    with pytest.raises(CheckpointError, match=r"answer_to_index and index_to_answer disagree, e.g. on \['yes', 'no'\]"):
        load_original_checkpoint(checkpoint, answer_dict)


def test_answer_dict_must_be_given_as_its_file(tmp_path, golden):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    loaded = [{"yes": 0}, {"0": "yes"}]
    with pytest.raises(TypeError, match="^answer_dict must be the path of the original answer_dict.json, got a list$"):
        load_original_checkpoint(checkpoint, loaded)


def test_answer_dict_of_the_wrong_size(tmp_path, golden):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    answer_dict = tmp_path / "answers.json"
    answer_dict.write_text(json.dumps([{"yes": 0}, {"0": "yes"}]))
    with pytest.raises(CheckpointError, match="has 1 answers .* classifier has 20 outputs"):
        load_original_checkpoint(checkpoint, answer_dict)
    # As many answers as outputs, but numbered from 1: answer i would name output i - 1's score.
    answers = [f"answer {index}" for index in range(20)]
    answer_dict.write_text(
        json.dumps([{a: i + 1 for i, a in enumerate(answers)}, {str(i + 1): a for i, a in enumerate(answers)}])
    )
    message = f"{answer_dict} has 20 answers with indices 1..20, but the checkpoint's classifier has 20 outputs."
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_original_checkpoint(checkpoint, answer_dict)


def test_without_a_processor_the_command_says_what_the_folder_lacks(tmp_path, golden, capsys):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    main(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--num_attention_heads", "4"])
    output = capsys.readouterr().out
    assert (
        "No --processor: the folder holds the model only. AutoProcessor and the pipeline need the question " in output
    )
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "tokenizer.json").exists()


def test_with_a_processor_the_folder_answers_questions(tmp_path, golden):
    from transformers import pipeline

    from rwsan.processing_rwsan import RWSANProcessor, build_question_tokenizer

    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    answers = [f"answer {i}" for i in range(golden["answer_size"])]
    answer_dict = write_answer_dict(tmp_path / "answer_dict.json", answers)
    vocab = {"PAD": 0, "UNK": 1, **{f"word{i}": i for i in range(2, golden["token_size"])}}
    # Longer questions than the paper's 16 words: the checkpoint does not say, the converted config takes 20.
    processor = RWSANProcessor(
        build_question_tokenizer(vocab),
        id2label=dict(enumerate(answers)),
        image_feature_size=48,
        max_question_length=20,
    )
    processor.save_pretrained(tmp_path / "processor")

    main(
        [
            "--checkpoint",
            str(checkpoint),
            "--output_dir",
            str(tmp_path / "hub"),
            "--answer_dict",
            str(answer_dict),
            "--processor",
            str(tmp_path / "processor"),
        ]
    )
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert "custom_pipelines" in config and (tmp_path / "hub" / "pipeline_rwsan.py").is_file()
    assert (config["max_question_length"], config["max_regions"]) == (20, 100)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert card.startswith("---\nlicense: mit") and "converted from `ckpt.pkl`" in card
    # The usage example loads the folder by its final path, not that of the folder it was written in.
    assert f'pipeline(model="{tmp_path / "hub"}", trust_remote_code=True)  # once uploaded, its hub id' in card
    vqa = pipeline("vqa-features", model=str(tmp_path / "hub"), device="cpu")
    # The golden questions, and their images zero-padded as the original pads them: the original's scores.
    inputs = [
        {"question": " ".join(f"word{token}" for token in question if token), "image_features": features}
        for question, features in zip(golden["ques_ix"].tolist(), golden["img_feat"])
    ]
    for result, logits in zip(vqa(inputs, top_k=len(answers)), golden["logits"]):
        assert result[0]["answer"] == answers[logits.argmax()]
        scores = {item["answer"]: item["score"] for item in result}
        assert scores == pytest.approx(dict(zip(answers, logits.sigmoid().tolist())), abs=1e-5)

    wrong = RWSANProcessor(build_question_tokenizer(vocab), id2label={0: "yes"}, image_feature_size=48)
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(
        CheckpointError,
        match=r"^The answers of the checkpoint \(20\) are not those of the processor in .*wrong \(1\): answer 0 is "
        r"'answer 0' in the model but 'yes' in the processor, .* \(the checkpoint's answers are named by --answer_dict",
    ):
        convert(str(checkpoint), str(tmp_path / "out"), str(answer_dict), str(tmp_path / "wrong"))
    fewer_words = RWSANProcessor(
        build_question_tokenizer(dict(list(vocab.items())[:30])),
        id2label=dict(enumerate(answers)),
        image_feature_size=48,
    )
    fewer_words.save_pretrained(tmp_path / "fewer_words")
    with pytest.raises(CheckpointError, match="^the checkpoint embeds 50 question tokens but the tokenizer of the "):
        convert(str(checkpoint), str(tmp_path / "out"), str(answer_dict), str(tmp_path / "fewer_words"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--processor", "absent"], "Processor folder not found: absent"),
        (["--num_attention_heads", "0"], "num_attention_heads must be at least 1, got 0"),
        (
            ["--num_attention_heads", "3"],
            ".*ckpt.pkl: 'RWSA_layer.srwsa.denceenc1.mhatt.linear_k.weight' has 16 outputs, which 3 heads cannot "
            r"share; give the training run's number of heads \(MULTI_HEAD\)",
        ),
    ],
)
def test_command_line_mistakes_get_one_line_errors(tmp_path, golden, capsys, arguments, message):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out"), *arguments])
    assert exit_info.value.code == 2
    assert re.fullmatch(f"error: {message}\n", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_a_file_gets_a_one_line_error(tmp_path, golden, capsys):
    checkpoint = save_checkpoint(tmp_path / "ckpt.pkl", golden["state_dict"])
    (tmp_path / "out").write_text("user data")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: Output folder {tmp_path / 'out'} is a file; choose another path.\n"
    assert (tmp_path / "out").read_text() == "user data"
