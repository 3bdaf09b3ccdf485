"""Class labels from captions (text.encoder = "class", jaxsora/data/captions.py): the class a
caption names, the null class for an empty one, and clear errors for the rest."""

import pytest
from absl import app

from jaxsora import sample as sampler
from jaxsora.data import captions

NAMES = ("circle", "red circle", "square", "cross")


def test_a_caption_gets_the_class_it_names_the_longest_match_winning():
    assert captions.class_label("a blue square moving left", NAMES) == 2
    assert captions.class_label("A RED circle on a green background", NAMES) == 1
    assert captions.class_label("a green circle", NAMES) == 0
    assert captions.class_label("  ...  ", NAMES) is None  # no words: the null class


def test_a_caption_naming_no_class_or_two_is_refused_naming_both():
    with pytest.raises(captions.UnknownClassError, match="'a hexagon' names none of"):
        captions.class_label("a hexagon", NAMES)
    with pytest.raises(captions.UnknownClassError, match=r"names 2 classes.*'square', 'cross'"):
        captions.class_label("a square and a cross", NAMES)


def test_the_pack_fields_are_one_label_and_the_sampler_refuses_unknown_prompts():
    spec = captions.TextSpec(encoder="class", text_len=1, class_names=NAMES)
    fields = captions.text_fields("a cross", spec)
    assert fields["text_ids"].tolist() == [3] and fields["text_mask"].tolist() == [True]
    assert captions.text_fields("", spec)["text_mask"].tolist() == [False]
    assert captions.embedding_dim(spec) == 0

    from experiments import dit_image

    config = dit_image.get_config("runlocal")
    request = sampler.Request(prompt="a hexagon", frames=1, height=32, width=32, name="hex")
    with pytest.raises(app.UsageError, match="request 'hex': caption 'a hexagon' names none"):
        sampler.check_caption(request, config, lambda p: p)
