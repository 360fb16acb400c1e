"""rkif.metrics on a hand-made accuracy matrix: OP, BWT, FWT, forgetting, exact match, summarize."""

from __future__ import annotations

import pytest

from rkif.metrics import (
    backward_transfer,
    exact_match,
    forgetting,
    forward_transfer,
    overall_performance,
    points,
    summarize,
)

# acc[i][j]: accuracy on task i (row) after training stage j (column); K = 3.
ACC = [
    [0.60, 0.90, 0.50],  # task 1: peaks after stage 2 (0.90), ends at 0.50
    [0.10, 0.80, 0.70],  # task 2: 0.80 when learned, ends at 0.70
    [0.20, 0.30, 0.85],  # task 3: learned last
]
# accuracy of the untrained model on each task (b_i)
INITIAL = [0.05, 0.02, 0.10]

# OP  = (0.50 + 0.70 + 0.85) / 3 = 2.05 / 3 = 0.683333...
OP = 2.05 / 3
# BWT = ((0.50 - 0.60) + (0.70 - 0.80)) / (K - 1) = (-0.10 - 0.10) / 2 = -0.10
BWT = -0.10
# the wrong, K-divided version: -0.20 / 3 = -0.0666...
BWT_DIVIDED_BY_K = -0.20 / 3
# FWT = ((a[2][1] - b_2) + (a[3][2] - b_3)) / 2 = ((0.10 - 0.02) + (0.30 - 0.10)) / 2 = (0.08 + 0.20) / 2 = 0.14
FWT = 0.14
# forgetting: task 1: max(0.60, 0.90) - 0.50 = 0.40 (not a[1][1] - a[1][K] = 0.10);
#             task 2: max(0.80) - 0.70 = 0.10; task 3: None
FORGETTING = [0.40, 0.10, None]


def test_overall_performance_is_mean_of_last_column():
    assert overall_performance(ACC) == pytest.approx(OP)
    assert overall_performance(ACC) != pytest.approx(sum(ACC[i][i] for i in range(3)) / 3)


def test_backward_transfer_divides_by_k_minus_1():
    assert backward_transfer(ACC) == pytest.approx(BWT)
    assert backward_transfer(ACC) != pytest.approx(BWT_DIVIDED_BY_K)


def test_backward_transfer_positive():
    # 0.5 -> 0.8 on task 1: BWT = (0.8 - 0.5) / 1 = 0.3
    assert backward_transfer([[0.5, 0.8], [0.0, 0.9]]) == pytest.approx(0.3)


def test_forward_transfer():
    assert forward_transfer(ACC, INITIAL) == pytest.approx(FWT)
    # the first task and the diagonal play no part: changing them leaves FWT alone
    changed = [[0.0, 0.90, 0.50], [0.10, 0.0, 0.70], [0.20, 0.30, 0.0]]
    assert forward_transfer(changed, [1.0, 0.02, 0.10]) == pytest.approx(FWT)


def test_forgetting_per_task():
    got = forgetting(ACC)
    assert len(got) == 3
    assert got[0] == pytest.approx(FORGETTING[0])
    assert got[1] == pytest.approx(FORGETTING[1])
    assert got[2] is None


def test_forgetting_excludes_the_last_column():
    # task 1 improves at the end: max over j in [1, K-1) = 0.5, minus 0.9 = -0.4 (not 0)
    got = forgetting([[0.5, 0.9], [0.0, 0.7]])
    assert got[0] == pytest.approx(-0.4)
    assert got[1] is None


def test_non_square_matrix_has_no_transfer():
    mtl = [[0.7], [0.8], [0.9]]  # multi-task learning: one stage, three tasks
    assert overall_performance(mtl) == pytest.approx(0.8)
    assert backward_transfer(mtl) is None
    assert forward_transfer(mtl, [0.1, 0.2, 0.3]) is None
    assert forgetting(mtl) == [None, None, None]


def test_single_task_has_no_transfer():
    one = [[0.75]]
    assert overall_performance(one) == pytest.approx(0.75)
    assert backward_transfer(one) is None
    assert forward_transfer(one, [0.1]) is None
    assert forgetting(one) == [None]


@pytest.mark.parametrize("prediction, label, expected", [
    ("positive", "positive", True),
    ("Positive", "positive", True),
    ("  POSITIVE \n", "positive", True),
    ("Science or Technology", "science or technology ", True),
    ("\tneutral", "Neutral\n", True),
    ("negative", "positive", False),
    ("positive.", "positive", False),
    ("posi tive", "positive", False),
    ("", "positive", False),
    ("positive negative", "positive", False),
])
def test_exact_match(prediction, label, expected):
    assert exact_match(prediction, label) is expected


def test_summarize_has_all_four_keys():
    res = summarize(ACC, INITIAL)
    assert set(res) == {"op", "bwt", "fwt", "forgetting"}
    assert res["op"] == pytest.approx(OP)
    assert res["bwt"] == pytest.approx(BWT)
    assert res["fwt"] == pytest.approx(FWT)
    assert res["forgetting"][:2] == pytest.approx(FORGETTING[:2])
    assert res["forgetting"][2] is None


def test_summarize_non_square():
    res = summarize([[0.7], [0.8], [0.9]], [0.1, 0.2, 0.3])
    assert set(res) == {"op", "bwt", "fwt", "forgetting"}
    assert res["op"] == pytest.approx(0.8)
    assert res["bwt"] is None and res["fwt"] is None
    assert res["forgetting"] == [None, None, None]


# -- ROUGE-L (SuperNI's metric): F = 2PR / (P + R) with P = LCS / len(prediction), R = LCS / len(reference),
# over rouge-score's tokens (lowercased, split on non-alphanumerics), Porter-stemmed when longer than 3 characters.

def test_rouge_l_hand_computed():
    from rkif.metrics import rouge_l

    assert rouge_l("the cat sat", ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l("The Cat, sat!", ["the cat sat"]) == pytest.approx(1.0)          # case and punctuation
    # LCS("b a c", "a b c") = 2: P = R = 2/3
    assert rouge_l("b a c", ["a b c"]) == pytest.approx(2 / 3)
    # LCS = 3 of 3 predicted and 4 reference tokens: P = 1, R = 3/4, F = 2 * 3/4 / (7/4) = 6/7
    assert rouge_l("the cat sat", ["the cat sat down"]) == pytest.approx(6 / 7)
    assert rouge_l("", ["the cat sat"]) == 0.0
    assert rouge_l("dog", ["the cat sat"]) == 0.0


def test_rouge_l_stems():
    from rkif.metrics import rouge_l

    # stemmed: [a, cat, run] vs [the, cat, are, run]: LCS 2, P = 2/3, R = 2/4, F = 4/7; unstemmed no word is shared
    assert rouge_l("a cat runs", ["the cats are running"]) == pytest.approx(4 / 7)


def test_rouge_l_takes_the_best_reference():
    from rkif.metrics import rouge_l

    # 0 against the first reference, 6/7 against the second, 2/3 against the third: the maximum
    assert rouge_l("the cat sat", ["a dog ran", "the cat sat down", "cat sat on"]) == pytest.approx(6 / 7)
    assert rouge_l("the cat sat", ["the cat sat down", "the cat sat"]) == pytest.approx(1.0)


def test_score_is_the_mean_of_the_task_metric():
    from rkif.metrics import accuracy, score

    preds, refs = ["the cat sat", "b a c", "x"], [["the cat sat down"], ["a b c"], ["y", "z"]]
    assert score("rougeL", preds, refs) == pytest.approx((6 / 7 + 2 / 3 + 0) / 3)
    # exact match: the best reference counts; with one reference each it is the paper's accuracy
    assert score("exact_match", ["Yes", "no", "maybe"], [["yes"], ["yes", "No "], ["no"]]) == pytest.approx(2 / 3)
    assert score("exact_match", ["Yes", "no"], [["yes"], ["yes"]]) == accuracy(["Yes", "no"], ["yes", "yes"])
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("bleu", preds, refs)


def test_points_rounds_the_exact_value_not_its_floating_point_product():
    # 100 * 0.6375 == 63.74999999999999; the exact 63.75 is a half and rounds to even, as 67.25 does
    assert f"{100 * 0.6375:.1f}" == "63.7" and points(100 * 0.6375) == "63.8"
    assert points(100 * 0.6725) == "67.2" and points(100 * 0.1) == "10.0" and points(-3.05, "+.1f") == "-3.0"
    assert points(62.5, ".0f") == "62" and points(100 * 0.635, ".0f") == "64"
