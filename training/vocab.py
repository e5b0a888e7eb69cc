"""Vocabularies of the understanding heads, built from training annotations.

- Answers (VQA v2 practice): every normalised answer given at least `min_count` times,
  most frequent first.
- Caption tokens: the WordPiece ids that occur in the training captions, plus [CLS]
  (start), [SEP] (end) and [UNK]; the decoder only ever emits these.
- Caption words: the whole words those pieces spell in the training captions; decoding
  ends a word only where one of these ends (glipv2.captioning.MentionRules).
- Checked phrases: every colour-shape phrase of the shapes world; a caption names one only
  where the detector finds it (glipv2.captioning.CheckedRules).

For the on-the-fly shapes world, the annotations of the first `scan` training scenes are
read (scenes only, no images drawn, about a second for 4,000).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from glipv2.captioning import pieces_text
from glipv2.text import Tokenizer
from glipv2.understanding import caption_pieces
from training import shapes_world as sw
from training.data import understanding_targets
from training.text_metrics import normalize_answer


def answer_vocabulary(answers: Iterable[str], min_count: int = 1) -> tuple[str, ...]:
    counts = Counter(normalize_answer(a) for a in answers)
    kept = [a for a, n in counts.items() if n >= min_count and a]
    return tuple(sorted(kept, key=lambda a: (-counts[a], a)))


def caption_vocabulary(encoded: Iterable[Sequence[int]], tokenizer: Tokenizer) -> tuple[int, ...]:
    """Sorted WordPiece ids of the encoded captions, [CLS] (start), [SEP] (end) and [UNK]
    included."""
    ids: set[int] = {tokenizer.cls_id, tokenizer.sep_id, tokenizer.token_to_id("[UNK]")}
    for c in encoded:
        ids.update(int(i) for i in c)
    return tuple(sorted(ids))


def caption_word_list(encoded: Iterable[Sequence[int]], tokenizer: Tokenizer) -> tuple[str, ...]:
    """Sorted whole words of the encoded captions as the decoder spells them (WordPieces
    joined: lower case, punctuation its own word): ModelConfig.caption_words."""
    words: set[str] = set()
    for c in encoded:
        pieces = caption_pieces(tokenizer, [i for i in c if i not in (tokenizer.cls_id, tokenizer.sep_id)])
        words.update(pieces_text(pieces).split())
    return tuple(sorted(words))


def shapes_vocabularies(seed: int, tokenizer: Tokenizer,
                        scan: int = 4000) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """(answers, caption token ids, caption words) of the first `scan` training scenes."""
    answers: list[str] = []
    captions: list[str] = []
    for i in range(scan):
        scene = sw.sample_scene(np.random.default_rng([seed, i]))
        _, answer, caps = understanding_targets(scene, seed, i)
        answers.append(answer)
        captions.extend(caps)
    encoded = [tokenizer.encode(c).ids for c in captions]  # once, for both caption vocabularies
    return answer_vocabulary(answers), caption_vocabulary(encoded, tokenizer), caption_word_list(encoded, tokenizer)


def shapes_checked_phrases() -> tuple[str, ...]:
    """Every "colour shape" phrase of the shapes world, colour by colour:
    ModelConfig.caption_checked_phrases. Its captions name each object so (glipv2.captioning)."""
    return tuple(f"{c} {s}" for c in sw.COLOURS for s in sw.SHAPES)
