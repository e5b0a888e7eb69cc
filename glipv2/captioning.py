"""Caption decoding around any engine (PyTorch, ONNX Runtime, Triton): greedy and beam search.

numpy only. An engine exposes the caption decoder as two calls (the same split as the
exported graphs):
- start(images uint8 [B, 3, H, W]) -> (logprobs [B, V], past_k, past_v, cross_k, cross_v):
  encodes the image and runs the first step from the start token;
- step(tokens [N], past_k, past_v, cross_k, cross_v) -> (logprobs [N, V], past_k, past_v).
Caches are batch-first: [N, L, H, t, d] (self-attention, t grows by one per step) and
[N, L, H, M, d] (cross-attention, fixed). Every row of a batch moves in lockstep, so several requests
decode as one batch; a row that is done leaves the batch (its cache rows are dropped).

An engine may instead run the whole loop itself (CaptionLoop.decode): the Triton backend's
`caption` model runs this module's beam_search inside Triton, next to the graphs, so the
caches never cross the network. `decode` picks the engine's loop when it has one. This file
imports numpy only: `make export` copies it into that Triton model's folder as is.

Decode rules (MentionRules) say what a hypothesis may become. Checked phrases
(PhraseCheck, CheckedRules) add what the image holds: the caller grounds the model's
checked phrases ("red circle", ...) with the detector first, and a caption names one only
where the detector found it (glipv2.runtime.batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

DEFAULT_MAX_LEN = 30
MAX_BEAM = 5  # Triton's caption_step batch limit is max_batch_size x MAX_BEAM
# The API's, CLI's and evaluation's beam: on the demo model's val captions beam 3 names
# more of the drawn colour-shape pairs and fewer absent ones than greedy decoding, at about
# half of greedy's throughput in batches (README, "Captions, later on 2026-12-01").
DEFAULT_BEAM = 3


class CaptionEngine(Protocol):
    def start(self, images: np.ndarray) -> tuple[np.ndarray, ...]: ...

    def step(self, tokens: np.ndarray, past_k: np.ndarray, past_v: np.ndarray,
             cross_k: np.ndarray, cross_v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class CaptionLoop(Protocol):
    def decode(self, images: np.ndarray, beam_size: int, max_len: Sequence[int],
               found: np.ndarray | None = None) -> list["Hypothesis"]:
        """The whole decode (beam_search with this module's defaults and rules) run by the
        engine; found: bool [B, C], which checked phrases each image holds (None: no check)."""
        ...


@dataclass
class Hypothesis:
    tokens: list[int]  # decoder shortlist indices, end token excluded
    logprob: float  # summed log-probability (end token included when it ended)

    def score(self, length_penalty: float) -> float:
        return self.logprob / max(1, len(self.tokens) + 1) ** length_penalty


def _limits(max_len: int | Sequence[int], images: int, beam_size: int) -> list[int]:
    """One token limit per image (max_len may be one for all), checked with the beam size."""
    limits = [int(max_len)] * images if np.isscalar(max_len) else [int(m) for m in max_len]
    if len(limits) != images or min(limits, default=1) < 1:
        raise ValueError("max_len needs one positive length per image")
    if not 1 <= beam_size <= MAX_BEAM:
        raise ValueError(f"beam_size must be in 1..{MAX_BEAM}")
    return limits


def decode(engine: CaptionEngine | CaptionLoop, images: np.ndarray, end_index: int, beam_size: int = 1,
           max_len: int | Sequence[int] = DEFAULT_MAX_LEN, rules: DecodeRules | None = None,
           check: "PhraseCheck | None" = None, found: np.ndarray | None = None) -> list[Hypothesis]:
    """Best hypothesis per image: the engine's own loop when it has one (it holds the same
    rules and check), else beam_search here over its start / step calls. found: bool
    [B, len(check.phrases)], the checked phrases each image holds; None: no check."""
    limits = _limits(max_len, images.shape[0], beam_size)
    loop = getattr(engine, "decode", None)
    if loop is not None:
        return loop(images, beam_size, limits, found)
    if found is not None:
        if check is None or rules is None:
            raise ValueError("found needs the decode rules and the phrase check")
        return beam_search(engine, images, end_index, beam_size, limits, rules=check.rules_per_image(rules, found))
    return beam_search(engine, images, end_index, beam_size, limits, rules=rules)


def pieces_text(pieces: Sequence[str]) -> str:
    """WordPiece strings joined as the decode rules read them: "##" pieces continue the
    word before, every other piece starts a word."""
    out = ""
    for p in pieces:
        out += p[2:] if p.startswith("##") else " " + p
    return out.strip()


class DecodeRules(Protocol):
    """Constraints on what a hypothesis may become (see MentionRules)."""

    def allows(self, tokens: Sequence[int], token: int) -> bool:
        """May `tokens` (shortlist indices) continue with `token`?"""
        ...

    def complete(self, tokens: Sequence[int]) -> bool:
        """May the caption end after `tokens`?"""
        ...


class MentionRules:
    """Captions that name each object once and stop on a complete phrase, in whole words,
    as decode-time rules over the decoder's shortlist (its WordPiece strings):
    - a token that would name a noun phrase a second time ("a red square and a red
      square") is never chosen; "another red square" stays allowed (glipv2.phrases);
    - the end token only follows a noun phrase's last word (not "... and a", not "... to
      the left of"). At the length limit a hypothesis that is still inside a phrase gives
      way to the best complete caption seen on the way (see beam_search);
    - with `words` (the training captions' words, ModelConfig.caption_words): a piece that
      continues a word must keep it the start of one of them, and a new word or the end
      only follows a whole one. Without this, refusing the last piece of a repeated
      "red he|xa|gon" left "a red hexa" and a new word after it (29 of the greedy
      captions of the demo model on 200 val images).
    The text tests are glipv2.phrases' repeated_mention and ends_on_phrase, passed in: this
    module imports numpy only (Triton's caption model gets phrases.py beside it)."""

    def __init__(self, pieces: Sequence[str], repeated: Callable[[str], bool], ends_well: Callable[[str], bool],
                 words: Sequence[str] = ()) -> None:
        self.pieces = [p or "" for p in pieces]
        self.repeated, self.ends_well = repeated, ends_well
        self.words = frozenset(words)
        self.word_starts = frozenset(w[:i] for w in self.words for i in range(1, len(w) + 1))

    def _whole_word_before(self, tokens: Sequence[int]) -> bool:
        """Does the text end on a whole word (or is it empty)? Always, without words."""
        return not self.words or not tokens or self.text(tokens).rsplit(" ", 1)[-1] in self.words

    def text(self, tokens: Sequence[int]) -> str:
        return pieces_text([self.pieces[t] for t in tokens])

    def allows(self, tokens: Sequence[int], token: int) -> bool:
        text = self.text([*tokens, token])
        if self.words:
            if self.pieces[token].startswith("##"):
                if text.rsplit(" ", 1)[-1] not in self.word_starts:
                    return False
            elif not self._whole_word_before(tokens):
                return False
        return not self.repeated(text)

    def complete(self, tokens: Sequence[int]) -> bool:
        return self._whole_word_before(tokens) and self.ends_well(self.text(tokens))


class PhraseCheck:
    """Which of the model's checked phrases a caption's text ends on.

    phrases: ModelConfig.caption_checked_phrases, e.g. "red circle"; a text ends on one
    when its last words are the phrase's, the last one also as a plural made with "s" or
    "es" ("two red circles", "a blue cross", "two blue crosses"): irregular plurals go
    unchecked. The check fires as soon as the last word reads so, before it is known to be
    whole: a word that merely starts with a checked noun ("red crossing" for "red cross")
    is checked as that noun."""

    def __init__(self, phrases: Sequence[str]) -> None:
        self.phrases = tuple(phrases)
        self._forms: dict[tuple[str, ...], int] = {}
        for i, phrase in enumerate(self.phrases):
            words = tuple(phrase.lower().split())
            if not words:
                raise ValueError("a checked phrase needs at least one word")
            for suffix in ("", "s", "es"):
                self._forms.setdefault(words[:-1] + (words[-1] + suffix,), i)
        self._lengths = sorted({len(w) for w in self._forms})

    def __len__(self) -> int:
        return len(self.phrases)

    def ending(self, text: str) -> int | None:
        """Index of the checked phrase `text` ends on, None if it ends on none."""
        words = text.lower().split()
        for n in self._lengths:
            if n <= len(words):
                found = self._forms.get(tuple(words[-n:]))
                if found is not None:
                    return found
        return None

    def rules_per_image(self, rules: "MentionRules", found: np.ndarray) -> list["CheckedRules"]:
        """rules with the check, for each image: found is bool [B, len(phrases)]."""
        found = np.asarray(found)
        if found.ndim != 2 or found.shape[1] != len(self.phrases):
            raise ValueError(f"found must be [images, {len(self.phrases)}] (one flag per checked phrase), "
                             f"got shape {list(found.shape)}")
        return [CheckedRules(rules, self, row) for row in found.astype(bool)]


class CheckedRules:
    """MentionRules for one image, plus what the detector found on it: a token that would
    complete a checked phrase the detector did not find ("a red circle" where no red circle
    scored at least the model's check threshold) is not allowed, so the beam takes its next
    best word, as it does for a repeated mention. Phrases outside the check are unaffected."""

    def __init__(self, rules: "MentionRules", check: PhraseCheck, found: Sequence[bool]) -> None:
        self.rules, self.check = rules, check
        self.found = [bool(f) for f in found]

    def allows(self, tokens: Sequence[int], token: int) -> bool:
        if not self.rules.allows(tokens, token):
            return False
        phrase = self.check.ending(self.rules.text([*tokens, token]))
        return phrase is None or self.found[phrase]

    def complete(self, tokens: Sequence[int]) -> bool:
        return self.rules.complete(tokens)


def beam_search(engine: CaptionEngine, images: np.ndarray, end_index: int, beam_size: int = 1,
                max_len: int | Sequence[int] = DEFAULT_MAX_LEN, length_penalty: float = 0.7,
                rules: DecodeRules | Sequence[DecodeRules] | None = None) -> list[Hypothesis]:
    """Best hypothesis per image. beam_size 1 is greedy decoding. max_len (tokens before the
    end token) may differ per image. rules (e.g. MentionRules; a list: one per image, e.g.
    CheckedRules) skip the candidates they do not allow and let a caption end only where it
    is complete; without rules every candidate counts."""
    b = images.shape[0]
    limits = _limits(max_len, b, beam_size)
    per_image = list(rules) if isinstance(rules, (list, tuple)) else [rules] * b
    if len(per_image) != b:
        raise ValueError(f"rules: one per image ({b}), got {len(per_image)}")
    k = beam_size
    logprobs, past_k, past_v, cross_k, cross_v = engine.start(images)
    rows = list(range(b))  # images still decoding; their beams hold consecutive cache rows
    beams: list[list[Hypothesis]] = [[Hypothesis([], 0.0)] for _ in range(b)]
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    # With rules: every complete hypothesis ended with the end token's log-probability,
    # whether or not that ending ranked among the k best: what a row falls back on when
    # the length limit cuts its hypotheses inside a phrase.
    endings: list[list[Hypothesis]] = [[] for _ in range(b)]
    while True:
        next_rows: list[int] = []
        slots: list[int] = []  # cache row each surviving beam continues from
        offset = 0
        for r in rows:
            ruled = per_image[r] is not None
            allows = per_image[r].allows if ruled else (lambda tokens, token: True)
            complete = per_image[r].complete if ruled else (lambda tokens: True)
            n = len(beams[r])
            total = np.asarray([h.logprob for h in beams[r]])[:, None] + logprobs[offset:offset + n]  # [n, V]
            alive: list[Hypothesis] = []
            rank = 0  # among the candidates the rules allow
            for flat in np.argsort(-total, axis=None, kind="stable"):
                if rank >= 2 * k:
                    break
                j, tok = divmod(int(flat), total.shape[1])
                tokens = beams[r][j].tokens
                if tok == end_index:
                    if not complete(tokens):
                        continue
                    if rank < k:  # an ending outside the k best candidates is not a contender
                        finished[r].append(Hypothesis(list(tokens), float(total[j, tok])))
                elif not allows(tokens, tok):
                    continue
                elif len(alive) < k:
                    alive.append(Hypothesis(tokens + [tok], float(total[j, tok])))
                    slots.append(offset + j)
                rank += 1
            if ruled:
                endings[r] += [Hypothesis(list(h.tokens), float(total[j, end_index]))
                               for j, h in enumerate(beams[r]) if h.tokens and complete(h.tokens)]
            offset += n
            # Done: k hypotheses ended, or the length limit is reached.
            if len(finished[r]) >= k or not alive or len(alive[0].tokens) >= limits[r]:
                if not ruled:
                    finished[r].extend(alive)  # cut by the limit: alive ones count as ended
                elif len(finished[r]) < k:
                    # Cut by the limit (or no allowed token left): not where the model would
                    # stop, maybe inside a phrase; the complete captions met on the way, each
                    # ended with its own end-token probability, compete instead.
                    finished[r].extend(endings[r])
                if not finished[r]:  # nothing complete at all: the cut hypothesis, as it is
                    finished[r] = alive or [Hypothesis(list(beams[r][0].tokens), beams[r][0].logprob)]
                del slots[len(slots) - len(alive):]
                continue
            beams[r] = alive
            next_rows.append(r)
        rows = next_rows
        if not rows:
            break
        idx = np.asarray(slots, dtype=np.int64)
        tokens = np.asarray([h.tokens[-1] for r in rows for h in beams[r]], dtype=np.int64)
        cross_k, cross_v = cross_k[idx], cross_v[idx]
        logprobs, past_k, past_v = engine.step(tokens, past_k[idx], past_v[idx], cross_k, cross_v)
    return [max(f, key=lambda h: h.score(length_penalty)) for f in finished]
