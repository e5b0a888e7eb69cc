"""VQA accuracy, BLEU-4 and CIDEr-D against values computed by hand (worked in comments)."""

import math

import pytest

from training.text_metrics import answer_scores, bleu, cider_d, normalize_answer, vqa_accuracy


def test_answers_are_normalised_as_vqa_v2_does():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("a Red one!") == "red 1"
    assert normalize_answer("  the hexagon ") == "hexagon"
    assert normalize_answer("3.5") == "3.5"  # a decimal point is kept


def test_vqa_accuracy_formula():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("blue", ["2"] * 10) == 0.0
    # 2 of 10 humans said red. Leaving out one of the two reds (2 subsets): 1 match -> 1/3;
    # leaving out a blue (8 subsets): 2 matches -> 2/3. Mean: (2/3 + 16/3) / 10 = 0.6.
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    # 3 of 10: 3 subsets with 2 matches (2/3), 7 with 3 (1) -> (2 + 7) / 10 = 0.9
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])


def test_answer_scores_are_soft():
    assert answer_scores(["red"] * 10) == {"red": 1.0}
    assert answer_scores(["red", "Red", "blue"]) == {"red": pytest.approx(2 / 3), "blue": pytest.approx(1 / 3)}


def test_bleu4_by_hand():
    refs = {1: ["the cat sat on a mat"]}
    # unigrams 5/6 ("the" twice, once in the ref), bigrams 3/5, trigrams 2/4, 4-grams 1/3,
    # same length (no brevity penalty): (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu({1: "the cat sat on the mat"}, refs) == pytest.approx(expected, rel=1e-6)
    assert bleu({1: "The cat sat on a mat."}, refs) == pytest.approx(1.0)  # case and punctuation ignored
    # every n-gram right but 4 words for a 6-word reference: brevity penalty exp(1 - 6/4)
    assert bleu({1: "the cat sat on"}, refs) == pytest.approx(math.exp(-0.5), rel=1e-6)
    # the closest reference length is the one used
    assert bleu({1: "the cat sat on"}, {1: ["the cat sat on a mat", "the cat sat on"]}) == pytest.approx(1.0)


def test_cider_d_by_hand():
    refs = {"a": ["red circle"], "b": ["blue star"]}
    # Two images, every n-gram in one image's references: idf = log(2) - log(1) for all.
    # Identical candidate: unigram and bigram cosines 1, no 3/4-grams (0): (1 + 1 + 0 + 0) / 4 * 10 = 5.
    assert cider_d({"a": "red circle", "b": "blue star"}, refs) == pytest.approx(5.0)
    # "red star" vs "red circle": unigram vectors {red, star} . {red, circle} = log2^2 over
    # norms 2 log2^2 -> 0.5; no bigram match: (0.5 + 0) / 4 * 10 = 1.25; mean with b's 5.
    assert cider_d({"a": "red star", "b": "blue star"}, refs) == pytest.approx((1.25 + 5.0) / 2)
    # the Gaussian length penalty (sigma 6) and clipping: a repeated word gains nothing
    longer = cider_d({"a": "red circle circle", "b": "blue star"}, refs)
    assert longer < 5.0


def test_cider_averages_over_references():
    refs = {"a": ["red circle", "a red circle"], "b": ["blue star", "a blue star"]}
    one = cider_d({"a": "red circle", "b": "blue star"}, refs)
    assert 0 < one < 10
    assert cider_d({"a": "blue star", "b": "red circle"}, refs) < one / 4


def test_caption_object_recall_reads_colour_shape_mentions():
    from training.evaluate_understanding import caption_object_recall

    instances = {"categories": [{"id": 1, "name": "circle"}, {"id": 4, "name": "star"}],
                 "annotations": [{"image_id": 1, "category_id": 1, "colour": "red"},
                                 {"image_id": 1, "category_id": 4, "colour": "blue"},
                                 {"image_id": 1, "category_id": 4, "colour": "blue"},
                                 {"image_id": 2, "category_id": 1, "colour": "green"}]}
    got = caption_object_recall({1: "a red circle above two yellow stars", 2: "a green circle"}, instances)
    # shapes: circle, star (image 1) + circle (image 2): 3 of 3; pairs: red circle, blue star,
    # green circle: red circle and green circle named, "yellow stars" is the wrong colour -> 2 of 3;
    # named pairs: red circle, yellow star, green circle, 2 of them drawn -> precision 2 of 3;
    # no phrase named twice, both captions end on a complete phrase
    assert got == {"caption_shape_recall": 1.0, "caption_pair_recall": pytest.approx(2 / 3),
                   "caption_pair_precision": pytest.approx(2 / 3), "caption_repeats": 0.0,
                   "caption_unfinished": 0.0}
