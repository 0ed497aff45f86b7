"""The "vqa-features" pipeline: answers questions about images given as pre-extracted region features.

This file is also copied beside saved models (`RWSANVQAPipeline.save_pretrained`) and imported there by
transformers' dynamic module loader (`pipeline(model=folder, trust_remote_code=True)`), where the `rwsan` package
may not be installed: it imports only the standard library, numpy, transformers, huggingface_hub (for the upload),
`region_files` and `processing_rwsan` (which brings torch and `configuration_rwsan`); saving copies those three files
beside it too.
"""

import os
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from huggingface_hub import create_repo
from transformers import AutoModelForVisualQuestionAnswering, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from .processing_rwsan import (
    HALF_CHARACTER,
    as_float32_array,
    box_count_fault,
    check_processor_fits_model,
    check_region_rows,
    checked_top_k,
    is_text,
    no_regions_fault,
)
from .region_files import image_size_fault, parse_size, read_region_archive, regions_first

logger = logging.get_logger(__name__)

TASK = "vqa-features"
# The task name a saved folder's config.json gives the pipeline. It differs from TASK because transformers asks for
# trust_remote_code whenever the requested task is one the folder's config names, even where `rwsan` is installed
# and has registered TASK itself; this way `pipeline("vqa-features", model=folder)` runs the installed code, and
# `pipeline(model=folder, trust_remote_code=True)` (task read off the config) runs the folder's copy.
SAVED_TASK = "rwsan-vqa-features"
# What `save_pretrained(push_to_hub=True)` takes for the upload, as `PreTrainedModel.save_pretrained` does.
_HUB_OPTIONS = ("repo_id", "commit_message", "token", "private", "revision", "create_pr")
ALL_WORDS_UNKNOWN_WARNING = "all question words are unknown to the vocabulary"
INPUT_KEYS = ("question", "image_features", "boxes")
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "image_features", "image_attention_mask")


class _NumberedInput:
    """An item of a list given to the pipeline, with its position, so that errors can name it."""

    def __init__(self, index: int, value):
        self.index = index
        self.value = value


def _rows_array(where: str, field: str, values, row_size: int, are_features: bool = False) -> np.ndarray:
    """Checks that `values` are `(num_regions, row_size)` finite real numbers that float32 holds, as the processor
    checks them (`as_float32_array`): region features floating-point, where a row that float32 would make all
    zeros is refused (it would mark padding), boxes floating-point or integers; returns them as float32 numpy."""
    rows = as_float32_array(f"{where}: {field}", values, integers=not are_features, zero_rows_mark_padding=are_features)
    check_region_rows(f"{where}: {field}", rows, row_size)
    if len(rows) == 0:
        raise ValueError(f"{where}: {field} has no regions")
    return rows


def load_region_file(path: str | os.PathLike, feature_size: int = 2048) -> dict:
    """
    Reads one image's region features from a `.npz` file in the layout of the original RWSAN release.

    Args:
        path (`str` or `os.PathLike`):
            The file. `x` holds the features, `(feature_size, num_regions)` as the original ships them or
            `(num_regions, feature_size)` (when both axes equal `feature_size`, the original's layout is assumed);
            `bbox` the `(num_regions, 4)` boxes and `image_h` / `image_w` the image size, all optional.
        feature_size (`int`, *optional*, defaults to 2048):
            Size of one region feature.

    Returns:
        `dict` with `image_features` `(num_regions, feature_size)` float32, `boxes` `(num_regions, 4)` float32
        or None, and `image_size` `(width, height)` or None.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"region feature file not found: {path}")
    where = f"region feature file {path}"
    try:
        arrays, unreadable = read_region_archive(path)
        features = regions_first(arrays["x"], feature_size)
        # The pipeline has no use for `num_bbox`; boxes and sizes it cannot read are refused as faulty ones are.
        for name in ("bbox", "image_w", "image_h"):
            if name in unreadable:
                raise ValueError(f"{name} {unreadable[name]}")
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    image_size = None
    if "image_w" in arrays and "image_h" in arrays:
        if fault := image_size_fault(arrays["image_w"], arrays["image_h"]):
            raise ValueError(f"{where}: {fault}")
        image_size = (parse_size(arrays["image_w"]), parse_size(arrays["image_h"]))
    features = _rows_array(where, "x", features, feature_size, are_features=True)
    boxes = arrays.get("bbox")
    if boxes is not None:
        # Their count is checked against the regions the model sees (`RWSANVQAPipeline.preprocess`).
        boxes = _rows_array(where, "bbox", boxes, 4)
    return {"image_features": features, "boxes": boxes, "image_size": image_size}


class RWSANVQAPipeline(Pipeline):
    """
    Visual question answering on pre-extracted region features (bottom-up attention features) with an RWSAN
    model (`RWSANForVQA`) and its `RWSANProcessor`. A processor that does not fit the model (other answers, question
    tokens or feature size: see `check_processor_fits_model`) is refused with a `ValueError`.

    An input is a dict (or, for one input, the same given as keywords: `vqa(question=..., image_features=...)`,
    the question possibly first: `vqa("What color is it?", image_features=...)`):
    - `"question"` (`str`);
    - `"image_features"`: the image's `(num_regions, feature_size)` region features (numpy array or torch
      tensor), or the path of a `.npz` file in the original release's layout (see [`load_region_file`]), whose
      boxes and image size then come with the attention weights. All-zero rows are padding, as for the model
      and the original: features padded to 100 regions answer as the unpadded ones;
    - `"boxes"` (*optional*): the `(num_regions, 4)` region boxes, for the attention weights.

    Call parameters:
    - `top_k` (`int`, defaults to 5): how many answers to return.
    - `output_attentions` (or its alias `return_attention`, `bool`, defaults to `False`): also return the
      attention-flattening weights over the regions and over the question words.

    Returns, for one input, the `top_k` answers, best first: `[{"answer": str, "score": float}, ...]`, the score
    being the answer's sigmoid probability; a list of inputs gives a list of those. When every question word is
    unknown to the vocabulary, each answer also has `"warning": "all question words are unknown to the
    vocabulary"` (it is still answered, as by the original). With `output_attentions=True`, a result is a dict:
    `answers` (the list above), `question`, `words` (the question words the model saw), `word_weights`,
    `region_weights` (one per region the model saw: every row up to the last one not all zero, the padding rows
    among them with weight 0), `boxes` (those of the same rows, or None) and `image_size` (`(width, height)` or
    None).

    Example, with `rwsan` imported (which registers the task "vqa-features"); without it, a folder saved by
    [`save_for_pipeline`] loads as `pipeline(model="path/to/rwsan", trust_remote_code=True)`:

    ```python
    >>> import rwsan  # noqa: F401
    >>> from transformers import pipeline
    >>> vqa = pipeline("vqa-features", model="path/to/rwsan")
    >>> vqa({"question": "What color is the cube?", "image_features": "COCO_val2014_000000000042.jpg.npz"}, top_k=3)
    [{'answer': 'red', 'score': 0.93}, {'answer': 'blue', 'score': 0.05}, {'answer': 'green', 'score': 0.01}]
    ```
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "RWSANVQAPipeline needs the RWSANProcessor: save it beside the model "
                "(processor.save_pretrained(model_folder)) or pass processor=..."
            )
        check_processor_fits_model(self.processor, self.model.config)

    def __call__(self, inputs=None, **kwargs):
        given = {key: kwargs.pop(key) for key in INPUT_KEYS if key in kwargs}
        if isinstance(inputs, str) and "question" not in given:
            # The question may come first, as transformers' VQA pipeline takes its image first.
            inputs, given = None, {"question": inputs, **given}
        if given:
            if inputs is not None:
                raise ValueError(
                    f"the input is given twice: as {type(inputs).__name__} and by the keywords "
                    f"{', '.join(given)}; give one"
                )
            inputs = given
        if inputs is None:
            raise ValueError("no input: give a dict with 'question' and 'image_features', or those two keywords")
        if isinstance(inputs, list):
            if not inputs:
                raise ValueError("The list of inputs is empty.")
            inputs = [_NumberedInput(index, item) for index, item in enumerate(inputs)]
        elif isinstance(inputs, types.GeneratorType):
            # Still a generator, which the base class streams; a bad item of thousands is named by its place.
            inputs = (_NumberedInput(index, item) for index, item in enumerate(inputs))
        return super().__call__(inputs, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Saves the model with `custom_pipelines` in its config.json and this file beside it, and the processor,
        so that `pipeline(model=save_directory, trust_remote_code=True)` works without the `rwsan` package. With
        `push_to_hub`, the files this save wrote are then uploaded in one commit (`repo_id`, by default the
        folder's name, `commit_message`, `token`, `private`, `revision`, `create_pr` as
        `PreTrainedModel.save_pretrained` takes them): the base class would push the model and the tokenizer each
        with the files it wrote, leaving the processor and the pipeline's code off the hub.

        The model's own config is left as it was: the base class sets `custom_pipelines` on it, and every later
        `model.save_pretrained` (a training checkpoint, say) would then name a pipeline file it does not write.
        """
        hub_options = {name: kwargs.pop(name) for name in _HUB_OPTIONS if name in kwargs}
        # What the folder held before: only what this save writes is uploaded (not a training run's checkpoints).
        files_before = self._get_files_timestamps(save_directory) if os.path.isdir(save_directory) else {}
        # The base class writes `custom_pipelines` from the class's registration, one entry per task name.
        register_pipeline()
        self._registered_impl = {SAVED_TASK: PIPELINE_REGISTRY.supported_tasks[TASK]}
        config = self.model.config
        had_custom_pipelines = hasattr(config, "custom_pipelines")
        previous_custom_pipelines = getattr(config, "custom_pipelines", None)
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            del self._registered_impl
            if had_custom_pipelines:
                config.custom_pipelines = previous_custom_pipelines
            elif hasattr(config, "custom_pipelines"):
                del config.custom_pipelines
        self.processor.save_pretrained(save_directory)
        if push_to_hub:
            self._upload_saved_files(save_directory, files_before, **hub_options)

    def _upload_saved_files(
        self,
        save_directory,
        files_before: dict[str, float],
        repo_id: str | None = None,
        commit_message: str | None = None,
        token: bool | str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ):
        repo_id = repo_id or Path(save_directory).resolve().name
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        self._upload_modified_files(
            save_directory,
            repo_id,
            files_before,
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
        )

    def get_iterator(self, *args, **kwargs):
        # Batches are padded on the tokenizer's padding_side, read when the iterator is made; RWSAN's questions and
        # regions are padded on the right, as the processor pads them (see `RWSANProcessor`).
        padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            return super().get_iterator(*args, **kwargs)
        finally:
            self.tokenizer.padding_side = padding_side

    def _sanitize_parameters(self, top_k=None, output_attentions=None, return_attention=None):
        forward_parameters, postprocess_parameters = {}, {}
        if top_k is not None:
            postprocess_parameters["top_k"] = checked_top_k(top_k)
        if output_attentions is not None and return_attention is not None and output_attentions != return_attention:
            raise ValueError(
                f"output_attentions={output_attentions} and return_attention={return_attention} disagree; "
                "they are the same option"
            )
        output_attentions = output_attentions if output_attentions is not None else return_attention
        if output_attentions is not None:
            forward_parameters["output_attentions"] = bool(output_attentions)
            postprocess_parameters["output_attentions"] = bool(output_attentions)
        return {}, forward_parameters, postprocess_parameters

    def preprocess(self, inputs) -> dict:
        where = "input"
        if isinstance(inputs, _NumberedInput):
            where, inputs = f"inputs[{inputs.index}]", inputs.value
        if not isinstance(inputs, Mapping):
            raise ValueError(
                f"{where}: expected a dict with 'question' and 'image_features', got {type(inputs).__name__}"
            )
        unknown_keys = sorted(set(inputs) - set(INPUT_KEYS), key=str)
        if unknown_keys:
            raise ValueError(
                f"{where}: unknown keys {', '.join(map(repr, unknown_keys))}; an input has 'question', "
                "'image_features' and optionally 'boxes'"
            )
        for key in ("question", "image_features"):
            if key not in inputs:
                raise ValueError(f"{where}: missing {key!r}")

        question = inputs["question"]
        if not isinstance(question, str):
            raise ValueError(f"{where}: question must be a string, got {type(question).__name__}")
        if not question.strip():
            raise ValueError(f"{where}: question is empty")
        if not is_text(question):
            raise ValueError(f"{where}: question {question!r} {HALF_CHARACTER}")
        words = self._question_words(question)
        if not words:
            raise ValueError(f"{where}: question {question!r} has no words once its punctuation is removed")

        region_data = self._region_data(where, inputs["image_features"])
        if fault := no_regions_fault(region_data["image_features"], self.processor.max_regions):
            raise ValueError(f"{where}: image_features {fault}")
        names = ("boxes", "image_features")
        if inputs.get("boxes") is not None:
            region_data["boxes"] = _rows_array(where, "boxes", inputs["boxes"], 4)
        elif region_data["boxes"] is not None:
            names = (f"{inputs['image_features']}: bbox", "x")
        features, boxes = region_data["image_features"], region_data["boxes"]

        model_inputs = self.processor(text=question, image_features=[features])
        num_regions = model_inputs["image_features"].shape[1]
        if boxes is not None and (fault := box_count_fault(len(boxes), len(features), num_regions)):
            raise ValueError(f"{where}: {names[0]} has {len(boxes)} rows but {names[1]} has {fault}")
        all_words_unknown = bool((model_inputs["input_ids"] == self.tokenizer.unk_token_id).all())
        return {
            **model_inputs,
            "question": question,
            "words": words[: model_inputs["input_ids"].shape[1]],
            # Plain values and lists: batching collates them into per-question lists and hands them back unchanged.
            "num_regions": num_regions,
            "boxes": None if boxes is None else boxes[:num_regions].tolist(),
            "image_size": region_data["image_size"],
            "warning": ALL_WORDS_UNKNOWN_WARNING if all_words_unknown else None,
        }

    def _forward(self, model_inputs: dict, output_attentions: bool = False) -> dict:
        if self.model.training:
            logger.warning_once("The model is in training mode: dropout makes the answers random. Call model.eval().")
        outputs = self.model(
            **{name: model_inputs[name] for name in MODEL_INPUT_NAMES}, output_attentions=output_attentions
        )
        # "logits" comes first: batched pipelines read the batch size from the first entry.
        return {
            "logits": outputs.logits,
            "question_flattening_weights": outputs.question_flattening_weights,
            "image_flattening_weights": outputs.image_flattening_weights,
            **{name: value for name, value in model_inputs.items() if name != "image_features"},
        }

    def postprocess(self, model_outputs: dict, top_k: int = 5, output_attentions: bool = False):
        answers = self.processor.post_process(model_outputs["logits"], top_k=top_k)[0]
        if model_outputs["warning"] is not None:
            for answer in answers:
                answer["warning"] = model_outputs["warning"]
        if not output_attentions:
            return answers

        # Batches are padded: keep the weights of the words and regions of this question only.
        num_words = int(model_outputs["attention_mask"].sum())
        num_regions = model_outputs["num_regions"]
        return {
            "answers": answers,
            "question": model_outputs["question"],
            "words": model_outputs["words"],
            "word_weights": model_outputs["question_flattening_weights"][0, :num_words].float().tolist(),
            "region_weights": model_outputs["image_flattening_weights"][0, :num_regions].float().tolist(),
            "boxes": model_outputs["boxes"],
            "image_size": model_outputs["image_size"],
        }

    def _question_words(self, question: str) -> list[str]:
        """The words the processor's tokenizer makes of the question (unknown ones included, by their text)."""
        tokenizer = self.tokenizer.backend_tokenizer
        normalized = tokenizer.normalizer.normalize_str(question)
        return [word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]

    def _region_data(self, where: str, image_features) -> dict:
        feature_size = self.processor.image_feature_size
        if isinstance(image_features, (str, os.PathLike)):
            try:
                return load_region_file(image_features, feature_size)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        return {
            "image_features": _rows_array(where, "image_features", image_features, feature_size, are_features=True),
            "boxes": None,
            "image_size": None,
        }


def register_pipeline():
    """Registers [`RWSANVQAPipeline`] as the "vqa-features" task of `transformers.pipeline`; saving a pipeline then
    records it in the model's config.json (`custom_pipelines`)."""
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is RWSANVQAPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=RWSANVQAPipeline,
        # A transformers class, by name: remote loading looks the model class up in `transformers`.
        pt_model=AutoModelForVisualQuestionAnswering,
        type="multimodal",
    )


def save_for_pipeline(model, processor, save_directory: str | os.PathLike):
    """Saves `model` and `processor` in `save_directory` with this pipeline: config.json then names it in
    `custom_pipelines` and this file is copied beside the weights, so that `pipeline(model=save_directory,
    trust_remote_code=True)` works where the `rwsan` package is not installed. The model is left where it is and
    in the mode it is in. A processor that does not fit the model is refused with a `ValueError`, and nothing is
    written."""
    RWSANVQAPipeline(model=model, processor=processor, device=model.device).save_pretrained(save_directory)
