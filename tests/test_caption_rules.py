"""Captions that name each object once and stop on a complete phrase (decode-time rules,
glipv2.captioning.MentionRules), name checked phrases only where the detector found them
(PhraseCheck, CheckedRules), the phrase helpers they rest on, and grounded captions' box
assignment (glipv2.understanding.grounded_phrases)."""

from __future__ import annotations

import numpy as np
import pytest

from glipv2.captioning import MentionRules as _Rules, PhraseCheck, beam_search
from glipv2.phrases import ends_on_phrase, mention_count, noun_phrases, repeated_mention
from glipv2.postprocess import Detections
from glipv2.understanding import caption_prompt, grounded_phrases
from tests.test_understanding import MarkovEngine


def MentionRules(pieces, words=()):  # noqa: N802 - the rules as CaptionPipeline builds them
    return _Rules(pieces, repeated_mention, ends_on_phrase, words)

# A toy decoder over 8 words whose likeliest path repeats itself: "a red square and a red
# square and ..." (after "square": "and" 0.9, end 0.1; after "red": "square" 0.9,
# "circle" 0.1).
PIECES = ["[SEP]", "a", "red", "square", "and", "circle", "another", "to"]
END, A, RED, SQUARE, AND, CIRCLE, ANOTHER, TO = range(8)


def _chain(transitions: dict[tuple[int, int], float], first: int, size: int = 8) -> MarkovEngine:
    """A toy decoder over `size` pieces: `first` starts every caption, then each piece is
    followed by the next one with the given probabilities (every other pair almost never)."""
    p = np.full((size, size), 1e-9)
    for (a, b), prob in transitions.items():
        p[a, b] = prob
    start = np.full(size, 1e-9)
    start[first] = 1.0
    return MarkovEngine(np.log(p / p.sum(1, keepdims=True)), np.log(start / start.sum()))


def _engine() -> MarkovEngine:
    return _chain({(A, RED): 1.0, (RED, SQUARE): 0.9, (RED, CIRCLE): 0.1, (SQUARE, AND): 0.9, (SQUARE, END): 0.1,
                   (CIRCLE, END): 1.0, (AND, A): 1.0}, first=A)


def _text(tokens):
    return MentionRules(PIECES).text(tokens)


@pytest.mark.parametrize("beam", [1, 3])
def test_rules_stop_a_repeated_mention(beam):
    images = np.zeros((1, 3, 4, 4), np.uint8)
    plain = beam_search(_engine(), images, END, max_len=12)[0]
    assert repeated_mention(_text(plain.tokens))  # greedy without rules repeats itself
    ruled = beam_search(_engine(), images, END, beam_size=beam, max_len=12, rules=MentionRules(PIECES))[0]
    text = _text(ruled.tokens)
    assert not repeated_mention(text) and ends_on_phrase(text)
    assert text in ("a red square and a red circle", "a red square", "a red circle")


def test_rules_end_on_a_complete_phrase_at_the_limit():
    """Cut at 6 tokens the caption would end "... and a red"; with the rules it is the best
    complete caption met on the way, with that caption's own log-probability."""
    images = np.zeros((1, 3, 4, 4), np.uint8)
    cut = beam_search(_engine(), images, END, max_len=6)[0]
    assert _text(cut.tokens) == "a red square and a red"
    ruled = beam_search(_engine(), images, END, max_len=6, rules=MentionRules(PIECES))[0]
    assert _text(ruled.tokens) == "a red square"
    assert ruled.logprob == pytest.approx(np.log(0.9 * 0.1), abs=1e-6)


def test_rules_allow_another_and_wordpieces():
    rules = MentionRules(["[SEP]", "a", "red", "he", "##xa", "##gon", "another", "and"])
    assert rules.text([1, 2, 3, 4, 5]) == "a red hexagon"
    seq = [1, 2, 3, 4, 5, 7, 6, 2, 3, 4]  # "a red hexagon and another red hexa"
    assert rules.allows(seq, 5)  # "another red hexagon" names a second one
    seq = [1, 2, 3, 4, 5, 7, 1, 2, 3, 4]
    assert not rules.allows(seq, 5)  # "a red hexagon and a red hexagon"
    assert rules.complete([1, 2, 3, 4, 5]) and not rules.complete([1, 2, 3, 4, 5, 7])


# A toy decoder whose likeliest path names "a red hexagon" (three pieces) twice: the
# repeat is refused only at its last piece, "##gon".
HEX_PIECES = ["[SEP]", "a", "red", "he", "##xa", "##gon", "and", "circle"]
HEX_WORDS = ("a", "red", "hexagon", "and", "circle")


def _hexagon_engine() -> MarkovEngine:
    e, a, red, he, xa, gon, and_, circle = range(8)
    return _chain({(a, red): 1.0, (red, he): 0.9, (red, circle): 0.1, (he, xa): 1.0,
                   (xa, gon): 0.95, (xa, e): 0.04, (xa, and_): 0.01, (gon, and_): 0.9, (gon, e): 0.1,
                   (and_, a): 1.0, (circle, e): 1.0}, first=a)


@pytest.mark.parametrize("beam", [1, 3])
def test_rules_never_leave_a_word_unfinished(beam):
    """Refusing "##gon" of a repeated "red hexagon" left "a red hexa" (seen in the demo
    model's captions, often with more words after it); with the captions' words the
    decoder backs off to a caption in whole words."""
    images = np.zeros((1, 3, 4, 4), np.uint8)
    rules = MentionRules(HEX_PIECES)
    plain = rules.text(beam_search(_hexagon_engine(), images, 0, max_len=12, rules=rules)[0].tokens)
    assert plain == "a red hexagon and a red hexa"  # the old rules end on a cut word
    worded = MentionRules(HEX_PIECES, HEX_WORDS)
    hyp = beam_search(_hexagon_engine(), images, 0, beam_size=beam, max_len=12, rules=worded)[0]
    text = worded.text(hyp.tokens)
    assert set(text.split()) <= set(HEX_WORDS), text
    assert text in ("a red hexagon", "a red hexagon and a red circle")
    assert not repeated_mention(text) and ends_on_phrase(text)


def test_word_rules_piece_by_piece():
    rules = MentionRules(HEX_PIECES, HEX_WORDS)
    a, red, he, xa, gon, and_ = 1, 2, 3, 4, 5, 6
    assert rules.allows([a, red], he) and rules.allows([a, red, he], xa) and rules.allows([a, red, he, xa], gon)
    assert not rules.allows([a, red, he], and_)  # "he" is not a caption word
    assert not rules.allows([a, red, he], gon)  # "hegon" starts no caption word
    assert rules.allows([a, red, he, xa, gon], and_)
    assert not rules.complete([a, red, he, xa]) and rules.complete([a, red, he, xa, gon])
    # without words, any piece may follow (the rules of a model trained before caption_words)
    assert MentionRules(HEX_PIECES).allows([a, red, he], and_)


def test_phrase_check_reads_the_phrase_a_text_ends_on():
    check = PhraseCheck(["red square", "blue cross", "star", "big red circle"])
    assert check.ending("a red square") == 0 and check.ending("two red squares") == 0
    assert check.ending("a blue cross") == 1 and check.ending("two blue crosses") == 1
    assert check.ending("a star") == 2 and check.ending("three stars") == 2
    assert check.ending("a big red circle") == 3 and check.ending("a red circle") is None  # all its words
    assert check.ending("a red square and") is None  # only where the text ends
    assert check.ending("a green square") is None and check.ending("") is None
    assert check.ending("a Red Square") == 0
    with pytest.raises(ValueError, match="one flag per checked phrase"):
        check.rules_per_image(MentionRules(PIECES), np.ones((2, 3), bool))


@pytest.mark.parametrize("beam", [1, 3])
def test_checked_rules_name_only_found_phrases_each_image_its_own(beam):
    """The toy decoder names a red square or a red circle; each image of a batch keeps its
    own flags: everything found decodes as unchecked, and a phrase the detector did not
    find is never named (the beam takes the other). Phrases outside the check are unaffected."""
    images = np.zeros((4, 3, 4, 4), np.uint8)
    check = PhraseCheck(["red square", "red circle"])
    rules = check.rules_per_image(MentionRules(PIECES), np.array([[1, 1], [0, 1], [1, 0], [0, 0]], bool))
    texts = [_text(h.tokens) for h in beam_search(_engine(), images, END, beam, max_len=12, rules=rules)]
    plain = beam_search(_engine(), images[:1], END, beam, max_len=12, rules=MentionRules(PIECES))[0]
    assert texts[0] == _text(plain.tokens)
    assert texts[1] == "a red circle"
    assert "red square" in texts[2] and "circle" not in texts[2]
    assert "square" not in texts[3] and "circle" not in texts[3]  # nothing found, nothing named
    assert not rules[1].allows([A, RED], SQUARE) and rules[1].allows([A, RED], CIRCLE)
    assert rules[3].allows([A], RED)  # "a red" completes no checked phrase yet
    unchecked = PhraseCheck(["blue square"]).rules_per_image(MentionRules(PIECES), np.zeros((1, 1), bool))[0]
    assert unchecked.allows([A, RED], SQUARE)
    with pytest.raises(ValueError, match="one per image"):
        beam_search(_engine(), images, END, beam, max_len=12, rules=rules[:2])


def test_check_prompts_split_the_phrases_evenly_within_the_limits():
    from glipv2.runtime.batch import check_prompts
    from glipv2.text import Tokenizer

    phrases = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange")
               for s in ("circle", "square", "triangle", "star", "hexagon", "cross")]
    prompts = check_prompts(Tokenizer(), phrases)
    assert [idx for idx, _ in prompts] == [list(range(18)), list(range(18, 36))]
    assert list(prompts[1][1].prompt.phrases) == phrases[18:] and prompts[1][1].num_phrases == 18
    assert [len(idx) for idx, _ in check_prompts(Tokenizer(), phrases[:20])] == [10, 10]  # even, not 18 + 2
    # a token limit that 18 phrases exceed: more prompts, each within it, sizes still even
    small = check_prompts(Tokenizer(max_tokens=30), phrases)
    assert len(small) > 2 and all(p.num_tokens <= 30 for _, p in small)
    assert [i for idx, _ in small for i in idx] == list(range(36)) and len({len(i) for i, _ in small}) <= 2
    assert check_prompts(Tokenizer(), []) == []


def test_phrase_helpers():
    assert repeated_mention("a red square and a red square")
    assert repeated_mention("A red square, a Red  square")
    assert not repeated_mention("a red square to the left of another red square")
    assert not repeated_mention("two red squares and a red square")
    assert not ends_on_phrase("a red square to the left of")
    assert not ends_on_phrase("a red square and")
    assert ends_on_phrase("a red square and two blue circles")
    c = "two red squares, a blue circle and 3 stars"
    assert [mention_count(c, s) for s in noun_phrases(c)] == [2, 1, 3]


def test_grounded_phrases_give_each_mention_its_own_boxes():
    caption = "a red square left of another red square and two blue circles"
    prompt = caption_prompt(caption)
    assert [caption[s:e] for [(s, e)] in prompt.phrase_spans] == ["red square", "red square", "blue circles"]
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10],
                      [20, 20, 30, 30], [70, 70, 80, 80], [90, 90, 99, 99]], np.float32)
    det = Detections(boxes, np.array([0.9, 0.8, 0.7, 0.95, 0.6, 0.5, 0.4], np.float32),
                     np.array([0, 0, 0, 1, 1, 2, 2]))
    first, second, plural = grounded_phrases(caption, prompt, det)
    assert (first.text, first.count, first.boxes) == ("red square", 1, [([0.0, 0.0, 10.0, 10.0], 0.9)])
    # the second mention's best box is the first one's: it takes its best other box
    assert second.boxes == [([20.0, 20.0, 30.0, 30.0], 0.6)]
    assert plural.count == 2 and [b for b, _ in plural.boxes] == [[70, 70, 80, 80], [90, 90, 99, 99]]
    assert caption_prompt("to the left of") is None
