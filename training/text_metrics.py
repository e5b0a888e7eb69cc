"""VQA accuracy (the VQA v2 formula) and caption BLEU-4 and CIDEr-D, in pure Python.

They follow the official scripts (VQA v2's vqaEval.py; pycocoevalcap's bleu_scorer.py
and cider_scorer.py) without their Java tokenizer: text is lower-cased, punctuation
stripped and split on white space, which gives the same tokens on plain sentences.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(answer: str) -> str:
    """VQA v2 answer processing: lower case, punctuation out, number words to digits,
    articles dropped ("Two." -> "2", "a red one" -> "red 1")."""
    text = _PUNCT.sub(" ", _PERIOD.sub("", answer.lower().replace("\n", " ").replace("\t", " ")))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(predicted: str, answers: Sequence[str]) -> float:
    """VQA v2: min(1, matching humans / 3), averaged over the 10 leave-one-out subsets of
    the human answers (so 3 matches of 10 score 0.9, not 1)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(predicted)
    gts = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:] if len(gts) > 1 else gts
        accs.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(accs) / len(accs)


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft training targets: each distinct normalised answer -> min(1, count / 3)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {a: min(1.0, n / 3.0) for a, n in counts.items()}


def caption_tokens(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of every 1..n-gram."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(candidates: Mapping[object, str], references: Mapping[object, Sequence[str]], n: int = 4) -> float:
    """Corpus BLEU-n as pycocoevalcap computes it (clipped n-gram precision summed over the
    corpus, brevity penalty against each sentence's closest reference length)."""
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for key, cand in candidates.items():
        words = caption_tokens(cand)
        refs = [caption_tokens(r) for r in references[key]]
        max_ref = Counter()
        for r in refs:
            for g, c in _ngrams(r, n).items():
                max_ref[g] = max(max_ref[g], c)
        for g, c in _ngrams(words, n).items():
            correct[len(g) - 1] += min(c, max_ref[g])
        for k in range(n):
            guess[k] += max(len(words) - k, 0)
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
    score = 1.0
    for k in range(n):
        score *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
    score **= 1.0 / n
    ratio = (test_len + 1e-15) / (ref_len + 1e-9)
    return score * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)


def cider_d(candidates: Mapping[object, str], references: Mapping[object, Sequence[str]],
            n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as pycocoevalcap computes it: tf-idf n-gram vectors (document frequency over
    the references of this corpus), candidate counts clipped by the reference's, a Gaussian
    length penalty, averaged over n = 1..4 and the references, times 10."""
    keys = list(candidates)
    refs = {k: [_ngrams(caption_tokens(r), n) for r in references[k]] for k in keys}
    df: Counter = Counter()
    for k in keys:
        for g in set(g for r in refs[k] for g in r):
            df[g] += 1
    log_n = math.log(float(len(keys)))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
        length = sum(c for g, c in counts.items() if len(g) == 1)
        return v, [math.sqrt(x) for x in norm], length

    total = 0.0
    for k in keys:
        vc, nc, lc = vec(_ngrams(caption_tokens(candidates[k]), n))
        score = [0.0] * n
        for r in refs[k]:
            vr, nr, lr = vec(r)
            for j in range(n):
                val = sum(min(x, vr[j].get(g, 0.0)) * vr[j].get(g, 0.0) for g, x in vc[j].items())
                if nc[j] and nr[j]:
                    val /= nc[j] * nr[j]
                score[j] += val * math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
        total += sum(score) / n / len(refs[k]) * 10.0
    return total / len(keys)
