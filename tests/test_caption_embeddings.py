"""caption_embeddings: the source's records unchanged, plus the frozen encoder's embeddings of
their captions (float16), and the identity check the trainer runs on them."""

import copy
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines.build import build
from data_pipelines.caption_embeddings import CaptionEmbeddingsConfig
from jaxsora.text.encoders import load_text_encoder
from jaxsora.text.identity import TextEncoderMismatchError, check_text_encoder

SOURCE = "synthetic_clips/small"
NAME = "caption_embeddings/synthetic_clips_small"
# float16 rounds to 11 significant bits: within 2**-11 of the float32 value, relatively. atol
# covers the tiny values (float16 subnormals) and the float32 differences between the build's
# batch of 64 captions and a batch of one (~2e-6 measured).
RTOL, ATOL = 2.0**-11, 1e-5


@pytest.fixture(scope="module")
def enc():
    return load_text_encoder(kind="minilm", checkpoint=None, max_tokens=16)


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    """caption_embeddings:synthetic_clips_small in its own data dir, reading the session's
    synthetic_clips/small (64 train + 16 validation: one full batch of 64, one padded)."""
    out = str(tmp_path_factory.mktemp("caption_tfds"))
    build(NAME, out, source_data_dir=data_dir, text_encoder="minilm")
    return out


def _splits(data_dir, built):
    for split in ("train", "validation"):
        source = tfds.data_source(SOURCE, split=split, data_dir=data_dir)
        # Read back with no builder kwargs: the dataset's own features.json and metadata.
        cached = tfds.data_source(NAME, split=split, data_dir=built)
        yield split, source, cached


def test_records_pass_through_unchanged(data_dir, built):
    for split, source, cached in _splits(data_dir, built):
        assert len(cached) == len(source) > 0, split
        for i in range(len(source)):
            s, c = source[i], cached[i]
            assert set(c) == set(s) | {"caption_emb", "caption_mask"}
            for key in s:
                assert np.asarray(c[key]).dtype == np.asarray(s[key]).dtype, (split, i, key)
                np.testing.assert_array_equal(c[key], s[key], err_msg=f"{split}[{i}].{key}")


def test_embeddings_are_the_encoders(data_dir, built, enc):
    worst = 0.0
    for split, _, cached in _splits(data_dir, built):
        for i in range(len(cached)):
            record = cached[i]
            ref, ref_mask = enc.embed([record["caption"].decode()])
            emb, mask = record["caption_emb"], record["caption_mask"]
            assert emb.dtype == np.float16 and emb.shape == (enc.max_tokens, enc.dim)
            assert mask.dtype == np.bool_ and mask.shape == (enc.max_tokens,)
            np.testing.assert_array_equal(mask, ref_mask[0], err_msg=f"{split}[{i}] mask")
            # [CLS] + words + [SEP], then padding: a prefix, and zero embeddings past it.
            n = int(mask.sum())
            assert 3 <= n < enc.max_tokens and mask[:n].all()
            assert not emb[~mask].any()
            np.testing.assert_allclose(
                emb.astype(np.float32), ref[0], rtol=RTOL, atol=ATOL, err_msg=f"{split}[{i}]"
            )
            worst = max(worst, float(np.abs(emb.astype(np.float32) - ref[0]).max()))
    # The tolerance is float16's rounding, not slack: a neighbouring caption is far outside it.
    a, b = enc.embed(["a red circle on a blue background", "a red square on a blue background"])[0]
    assert np.abs(a - b).max() > 100 * worst


def test_metadata(data_dir, built, enc):
    info = tfds.builder(NAME, data_dir=built).info
    assert info.metadata["text_encoder"] == enc.identity
    assert info.metadata["source"] == {"name": SOURCE, "data_dir": os.path.abspath(data_dir)}
    f16 = info.metadata["caption_emb"]
    assert f16["dtype"] == "float16" and f16["shape"] == [enc.max_tokens, enc.dim]
    for split in ("train", "validation"):
        assert 0 < f16["float16_max_abs_error"][split] < 6 * RTOL  # MiniLM's |x| < 6


def test_check_text_encoder(data_dir, built, enc):
    cached = tfds.data_source(NAME, split="train", data_dir=built)
    assert check_text_encoder(cached, enc.identity, NAME) == enc.identity
    # A copy of the same weights elsewhere is the same encoder.
    moved = dict(enc.identity, checkpoint="/elsewhere/minilm")
    assert check_text_encoder(cached.dataset_info.metadata, moved, NAME) == enc.identity

    longer = dict(enc.identity, max_tokens=32)
    with pytest.raises(TextEncoderMismatchError, match=r"max_tokens: 16 in the dataset vs 32"):
        check_text_encoder(cached, longer, NAME)
    tuned = copy.deepcopy(enc.identity)
    tuned["weights_sha256"]["model.safetensors"] = "0" * 64
    with pytest.raises(TextEncoderMismatchError, match="sha256 of the weights") as e:
        check_text_encoder(cached, dict(tuned, checkpoint="/elsewhere/tuned"), NAME)
    message = str(e.value)
    assert NAME in message and "max_tokens" not in message.split(". Rebuild")[0]
    assert "--text_encoder minilm --text_checkpoint /elsewhere/tuned" in message
    assert "--overwrite" in message and "model.text_len=16" in message
    t5 = dict(enc.identity, kind="t5")
    with pytest.raises(TextEncoderMismatchError, match="kind: 'minilm' in the dataset vs 't5'"):
        check_text_encoder(cached, t5, NAME)
    # Captions only (no embeddings): encoded at run time, by any encoder.
    source = tfds.data_source(SOURCE, split="train", data_dir=data_dir)
    assert check_text_encoder(source, longer, SOURCE) is None
    assert check_text_encoder({}, longer, SOURCE) is None


def test_batches_max_examples_and_rebuild_needs_overwrite(data_dir, tmp_path, enc):
    config = CaptionEmbeddingsConfig(
        name="test_batches", source=SOURCE, encode_batch=24, splits=("train",), max_examples=40
    )
    kwargs = dict(config=config, source_data_dir=data_dir, text_encoder="minilm")
    b = build("caption_embeddings", str(tmp_path), **kwargs)
    assert set(b.info.splits) == {"train"} and b.info.splits["train"].num_examples == 40
    cached = b.as_data_source("train")
    source = tfds.data_source(SOURCE, split="train", data_dir=data_dir)
    # Across the batch boundary (24 | 16 padded to 24): still record i's own caption.
    ref, _ = enc.embed([source[i]["caption"].decode() for i in (23, 24, 39)])
    for j, i in enumerate((23, 24, 39)):
        assert cached[i]["caption"] == source[i]["caption"]
        np.testing.assert_allclose(cached[i]["caption_emb"], ref[j], rtol=RTOL, atol=ATOL)

    # Another encoder into the same data_dir: refused (TFDS alone would reuse the old one)...
    with pytest.raises(ValueError, match=r"max_tokens: 16 in the dataset vs 8.*--overwrite"):
        build("caption_embeddings", str(tmp_path), text_max_tokens=8, **kwargs)
    # ...unless overwritten.
    b8 = build("caption_embeddings", str(tmp_path), overwrite=True, text_max_tokens=8, **kwargs)
    assert b8.info.metadata["text_encoder"]["max_tokens"] == 8
    assert b8.as_data_source("train")[0]["caption_emb"].shape == (8, enc.dim)
    reread = tfds.builder("caption_embeddings/test_batches", data_dir=str(tmp_path))
    assert reread.info.metadata["text_encoder"] == b8.info.metadata["text_encoder"]


def test_unbuilt_source_names_its_build_command(tmp_path):
    command = "build it first with `python -m data_pipelines.build --dataset sample_media --data"
    with pytest.raises(FileNotFoundError, match=command):
        build("caption_embeddings:sample_media", str(tmp_path), text_encoder="minilm")
    with pytest.raises(ValueError, match="--text_encoder"):
        build("caption_embeddings:synthetic_clips_small", str(tmp_path / "no_encoder"))


def test_training_reads_the_precomputed_embeddings_without_running_the_encoder(
    data_dir, built, monkeypatch
):
    """The pipeline on the embeddings dataset gives the packs of the same config encoding the
    source's captions as it reads them (to float16), and never runs the encoder; a run whose
    config names another encoder (or token count) is refused before any pack is made."""
    from jaxsora.compression import PixelSpace
    from jaxsora.data import captions, pipeline
    from tests.conftest import runlocal_config

    live = runlocal_config(data_dir, "runlocal,text=minilm")
    expected = [next(it) for it in [pipeline.make_batches(live, PixelSpace())] for _ in range(3)]
    cached = runlocal_config(built, "runlocal,text=minilm")
    cached.data.sources = [dict(name=NAME, weight=1.0)]

    def no_encoding(*args):
        raise AssertionError("the text encoder ran on a dataset of precomputed embeddings")

    monkeypatch.setattr(captions, "_embed_one", no_encoding)
    got = [next(it) for it in [pipeline.make_batches(cached, PixelSpace())] for _ in range(3)]
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys() and a["text_emb"].shape[-1] == 384
        for k in a:
            if k == "text_emb":
                np.testing.assert_allclose(b[k], a[k], rtol=RTOL, atol=ATOL)
            else:
                np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    other = copy.deepcopy(cached)
    other.model.text_len = 8
    with pytest.raises(TextEncoderMismatchError, match="max_tokens: 16 in the dataset vs 8"):
        pipeline.make_batches(other, PixelSpace())
    hashed = copy.deepcopy(cached)
    hashed.text.encoder = "hashed"
    with pytest.raises(TextEncoderMismatchError, match="text.encoder='hashed'"):
        pipeline.make_batches(hashed, PixelSpace())


def test_the_beam_build_embeds_on_the_workers_and_writes_the_same_records(
    data_dir, built, tmp_path
):
    """Two DirectRunner workers (threads: one MiniLM load and compile for both), one unit per
    split: the same records, identity and error statistics as the single-process build."""
    beam = build(
        NAME,
        str(tmp_path),
        source_data_dir=data_dir,
        text_encoder="minilm",
        beam_options="--runner=DirectRunner --direct_num_workers=2 "
        "--direct_running_mode=multi_threading",
    )
    here = tfds.builder(NAME, data_dir=built)
    for key in ("text_encoder", "source", "caption_emb", "recaptioner", "counts"):
        assert beam.info.metadata[key] == here.info.metadata[key], key
    for split in ("train", "validation"):
        a, b = here.as_data_source(split), beam.as_data_source(split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            assert sorted(a[i]) == sorted(b[i])
            for key in a[i]:
                np.testing.assert_array_equal(a[i][key], b[i][key], err_msg=f"{split}[{i}].{key}")
