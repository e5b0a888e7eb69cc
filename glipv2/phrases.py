"""Noun phrases of a caption by a small rule-based chunker (stdlib only, no NLTK data).

`noun_phrases(caption)` returns the character spans [start, end) of the noun phrases it
finds, in caption order: "a red circle to the left of a blue star and a green cross" ->
"red circle", "blue star", "green cross". Grounding (POST /v1/ground without spans)
grounds these.

The rules: the caption is split into words; a chunk ends at punctuation and at "break"
words (conjunctions, prepositions, spatial relations such as "left of" / "next to" /
"in front of", common verbs such as "is", "has", "sits", words ending in -ing that are
not in a short list of -ing nouns, pronouns and adverbs). Leading determiners,
quantifiers and numbers ("a", "the", "two", "some", "3") are dropped from each chunk;
what remains (adjectives + nouns, e.g. "large blue star") is a phrase. It is a
heuristic, not a parser: "man riding a bike" works, "flies" as a verb does not.
"""

from __future__ import annotations

import re

__all__ = ["noun_phrases", "phrases_of", "head_phrase", "mention_count", "repeated_mention", "ends_on_phrase"]

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019-][A-Za-z0-9]+)*")

DETERMINERS = frozenset("""
a an the this that these those some any each every all both no another other its his her their
my your our one two three four five six seven eight nine ten eleven twelve several many few
much more most lots lot couple pair number plenty
""".split())

CONJUNCTIONS = frozenset("and or but nor yet so then while whereas although though because if".split())

PREPOSITIONS = frozenset("""
of to on in at by for from with without into onto upon over under above below beneath
underneath behind beside besides between among amid around near across along against
through throughout toward towards inside outside within via atop after before during
like unlike than as about off up down out past beyond
""".split())

VERBS = frozenset("""
is are was were be been being am has have had having do does did can could will would
shall should may might must sits sit sat stands stand stood lies lie lay holds hold held
rides ride rode wears wear wore looks look looked seems seem appears appear contains
contain contained shows show shown shown covers cover covered carries carry carried
plays play played eats eat ate goes go went walks walk walked runs run ran flies
jumps jump jumped hangs hang hung rests rest touches touch touched surrounds surround
surrounded located placed positioned see sees saw seen find finds found
there here
""".split())

PRONOUNS = frozenset("""
it they them he she him we us you i me which who whom whose what where when how why
itself themselves something anything nothing everything someone anyone
""".split())

ADVERBS = frozenset("""
very also just only too not never always often really quite rather almost nearly
slightly fully partly directly right left top bottom front back side middle center centre
""".split())

# Direction words that are nouns after a determiner-free context ("top of", "left of")
# are treated as relations only when followed by these words; otherwise they are
# ordinary words ("the left circle" keeps "left").
_RELATION_HEADS = {"left": {"of"}, "right": {"of"}, "top": {"of"}, "bottom": {"of"},
                   "front": {"of"}, "back": {"of"}, "side": {"of"}, "middle": {"of"},
                   "center": {"of"}, "centre": {"of"}, "next": {"to"}, "close": {"to"},
                   "far": {"from"}, "adjacent": {"to"}, "near": set()}

# -ing words that are nouns (everything else ending in -ing is taken as a verb).
ING_NOUNS = frozenset("""
building buildings ceiling ceilings painting paintings ring rings king kings thing things
string strings wing wings swing swings spring evening morning clothing railing railings
awning awnings sibling siblings ping pudding frosting icing dressing stuffing bedding
wedding lightning clearing crossing landing sling spring stocking stockings bing
""".split())

_INTENSIFIERS = frozenset("very really quite rather just only also not too almost nearly".split())

_BREAK = CONJUNCTIONS | PREPOSITIONS | VERBS | PRONOUNS


def _is_break(words: list[str], i: int) -> bool:
    w = words[i]
    if w in _BREAK:
        return True
    if w in _RELATION_HEADS:
        follow = _RELATION_HEADS[w]
        nxt = words[i + 1] if i + 1 < len(words) else None
        if not follow or nxt in follow:
            return True
        # "to the left." / "on the right," at a chunk end: a direction, not a thing
        prev = words[i - 1] if i > 0 else None
        if w in ("left", "right") and prev == "the" and (nxt is None or nxt in _BREAK):
            return True
        return False
    if w in ADVERBS:
        return False  # direction words other than relations are kept ("top shelf")
    if len(w) > 4 and w.endswith("ing") and w not in ING_NOUNS:
        return True
    if len(w) > 3 and w.endswith("ly") and w not in ("fly", "family", "belly", "jelly", "lily", "bully"):
        return True  # adverbs: "slightly", "partially"
    return False


def noun_phrases(caption: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the noun phrases of `caption`, in order, not
    overlapping. An empty list when none is found."""
    tokens = [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(caption)]
    words = [t[2].lower() for t in tokens]
    chunks: list[list[int]] = []
    current: list[int] = []
    for i, (start, _, _) in enumerate(tokens):
        # punctuation (anything but spaces, hyphens, apostrophes) between two words ends a chunk
        gap = caption[tokens[i - 1][1]:start] if i > 0 else ""
        if current and gap.strip():
            chunks.append(current)
            current = []
        if _is_break(words, i):
            if current:
                chunks.append(current)
            current = []
            continue
        current.append(i)
    if current:
        chunks.append(current)

    spans: list[tuple[int, int]] = []
    for chunk in chunks:
        while chunk and (words[chunk[0]] in DETERMINERS or words[chunk[0]].isdigit() or words[chunk[0]] in _INTENSIFIERS):
            chunk = chunk[1:]
        while chunk and (words[chunk[-1]] in DETERMINERS or words[chunk[-1]] in ADVERBS - {"top", "bottom", "front", "back", "side", "middle", "center", "centre"}):
            chunk = chunk[:-1]
        if not chunk or not any(c.isalpha() for c in "".join(words[j] for j in chunk)):
            continue
        if all(words[j] in ADVERBS for j in chunk):
            continue
        spans.append((tokens[chunk[0]][0], tokens[chunk[-1]][1]))
    return spans


def phrases_of(caption: str) -> list[str]:
    """The text of noun_phrases(caption)."""
    return [caption[s:e] for s, e in noun_phrases(caption)]


def head_phrase(phrase: str) -> tuple[int, int] | None:
    """The span of the noun phrase a referring expression is about, when the phrase relates
    it to others: "the yellow circle above the green star" -> "yellow circle", "man riding a
    horse" -> "man" (its first noun phrase, as MDETR's referring-expression annotations mark
    the root noun phrase, which GLIP trains and evaluates on). None when the phrase has one
    noun phrase, or lists several ("red circle and blue star", "cats, dogs"): all of it is
    then the object."""
    spans = noun_phrases(phrase)
    if len(spans) < 2:
        return None
    gap = phrase[spans[0][1]:spans[1][0]]
    if "," in gap or any(w.lower() in CONJUNCTIONS for w in _WORD.findall(gap)):
        return None
    return spans[0]


# Determiners that introduce a second object of a kind already named ("a red square left
# of another red square"): naming the kind again after them is not a repetition.
_AGAIN = frozenset({"another", "other"})
_COUNTS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
           "ten": 10}


def _word_before(caption: str, start: int) -> str:
    words = _WORD.findall(caption[:start])
    return words[-1].lower() if words else ""


def mention_count(caption: str, span: tuple[int, int]) -> int:
    """How many objects the noun phrase at `span` names: its number word ("two red
    squares" -> 2, a digit too), else 1."""
    word = _word_before(caption, span[0])
    return int(word) if word.isdigit() else _COUNTS.get(word, 1)


def repeated_mention(caption: str) -> bool:
    """True when a noun phrase is named a second time without "another"/"other" before
    it ("a red square and a red square"); case-insensitive."""
    seen: set[str] = set()
    for start, end in noun_phrases(caption):
        text = " ".join(caption[start:end].lower().split())
        if text in seen and _word_before(caption, start) not in _AGAIN:
            return True
        seen.add(text)
    return False


def ends_on_phrase(caption: str) -> bool:
    """True when the caption ends with the last word of a noun phrase (it does not stop
    inside a connective such as "to the left of" or after "and")."""
    spans = noun_phrases(caption)
    return bool(spans) and not caption[spans[-1][1]:].strip()
