"""Recaptioning at build time (data_pipelines/recaption.py): the template rewrites the synthetic
captions, its identity is stored, training checks it against data.recaptioner, and sampling
can prompt in the same style."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import recaption
from data_pipelines.build import build
from data_pipelines.synthetic_clips.synthetic_clips import make_example
from jaxsora import prompts
from jaxsora.compression import make_stage
from jaxsora.data import pipeline
from tests.conftest import runlocal_config


@pytest.fixture(scope="module")
def recaptioned_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("recaptioned"))
    build("synthetic_clips:small", path, recaptioner="template")
    return path


def test_the_template_rewrites_every_synthetic_caption_and_stores_its_identity(recaptioned_dir):
    src = tfds.data_source("synthetic_clips/small", split="train", data_dir=recaptioned_dir)
    assert src.dataset_info.metadata["recaptioner"] == {"name": "template", "version": ""}
    for i in range(len(src)):
        original = make_example("train", i)
        caption = src[i]["caption"].decode()
        assert caption != original["caption"]
        kind = "photo" if original["frames"].shape[0] == 1 else "video"
        assert caption.startswith(f"a {kind} of ")
        assert f"plain {original['background']} background" in caption
        assert f"{original['color']} {original['shape']}" in caption
        if original["direction"] != "none":
            assert f"moves {original['direction']} across" in caption


def test_training_refuses_a_source_of_another_recaptioner(recaptioned_dir, data_dir):
    config = runlocal_config(recaptioned_dir)
    stage = make_stage("pixels")
    with pytest.raises(pipeline.RecaptionerMismatchError, match="data.recaptioner='identity'"):
        pipeline.make_batches(config, stage)
    config.data.recaptioner = "template"
    assert next(pipeline.make_batches(config, stage))["tokens"].shape[0] == config.batch_size
    # Datasets built before recaptioning (no identity stored) read as "identity".
    config = runlocal_config(data_dir)
    config.data.recaptioner = "template"
    with pytest.raises(pipeline.RecaptionerMismatchError, match="'identity', but .*'template'"):
        pipeline.make_batches(config, stage)


def test_sampling_prompts_in_the_recaptioned_style():
    extend = prompts.get_prompt_extender("data_pipelines.recaption:template_prompt")
    assert extend("green square moving up") == (
        "a video of a green square that moves up across a plain blue background"
    )
    assert extend("a purple diamond on an orange background") == (
        "a photo of a purple diamond on a plain orange background"
    )


def test_a_bad_recaptioner_name_says_what_is_expected():
    with pytest.raises(ValueError, match="expected one of .*identity.*package.module:function"):
        recaption.get_recaptioner("llava")
    with pytest.raises(ValueError, match="cannot import nope from json"):
        recaption.get_recaptioner("json:nope")
    media = recaption.Media(path="x", kind="video", array=np.zeros((2, 4, 4, 3), np.uint8))
    assert recaption.identity("a caption", media) == "a caption"
    assert media.frames(max_frames=1).shape == (1, 4, 4, 3)
