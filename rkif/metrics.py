"""Scores of answers, and continual-learning metrics as pure functions of the score matrix.

Each task names its scorer (``Task.metric``, a key of ``SCORERS``): exact match (accuracy) for the
classification benchmarks, ROUGE-L for SuperNI. A scorer maps one prediction and its references to
[0, 1]; a task's score is the mean over its examples.

``acc[i][j]`` is the score on task i after training stage j (rows = evaluated task, columns =
after training): the accuracy matrix, or the ROUGE-L matrix. With one task per stage the matrix is
square and stage j trains task j. OP, BWT, FWT and forgetting read it whatever the scorer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

Matrix = Sequence[Sequence[float]]
Scorer = Callable[[str, Sequence[str]], float]
ROUGE_INSTALL = "pip install rouge-score (the 'superni' extra: pip install -e '.[superni]' in a checkout)"


def exact_match(prediction: str, label: str) -> bool:
    """The paper's scorer: case-insensitive exact match after stripping white space."""
    return prediction.strip().lower() == label.strip().lower()


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Share of predictions that exactly match their label (case-insensitive, see ``exact_match``)."""
    return sum(exact_match(p, y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


def exact_match_any(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction exactly matches one of the references (``exact_match``), else 0.0."""
    return float(any(exact_match(prediction, r) for r in references))


@cache
def _rouge_l_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError(f"ROUGE-L needs the rouge-score package: {ROUGE_INSTALL}") from err
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure with Porter stemming, the maximum over the references (SuperNI's official
    scorer; ``rouge-score``'s tokenizer lowercases and splits on non-alphanumerics)."""
    scorer = _rouge_l_scorer()
    return max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references)


SCORERS: dict[str, Scorer] = {"exact_match": exact_match_any, "rougeL": rouge_l}
SCORER_NAMES = {"exact_match": "accuracy", "rougeL": "ROUGE-L"}


def scorer(name: str) -> Scorer:
    """The scorer called ``name``, checked to be usable now (its package installed)."""
    if name not in SCORERS:
        raise ValueError(f"unknown metric {name!r}: choose from {', '.join(SCORERS)}")
    if name == "rougeL":
        _rouge_l_scorer()
    return SCORERS[name]


def score(name: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean of the ``name`` scorer over examples (each prediction against its own references)."""
    fn = scorer(name)
    return sum(fn(p, refs) for p, refs in zip(predictions, references, strict=True)) / len(references)


def overall_performance(acc: Matrix) -> float:
    """OP = mean_i a[i][K], the mean accuracy after the last stage (Eq. 10)."""
    if not acc:
        raise ValueError("empty accuracy matrix")
    return sum(row[-1] for row in acc) / len(acc)


def backward_transfer(acc: Matrix) -> float | None:
    """BWT = mean over i < K of (a[i][K] - a[i][i]) (Eq. 11, divided by K - 1).

    None when it is undefined: fewer than two tasks, or a matrix that is not one task per stage.
    """
    k = len(acc)
    if k < 2 or any(len(row) != k for row in acc):
        return None
    return sum(acc[i][k - 1] - acc[i][i] for i in range(k - 1)) / (k - 1)


def forward_transfer(acc: Matrix, initial: Sequence[float]) -> float | None:
    """FWT = mean over i > 1 of (a[i][i-1] - b_i) (Lopez-Paz & Ranzato 2017).

    ``b_i`` is the accuracy on task i of the model before any training (``initial``): how much
    learning the earlier tasks helped task i before it was seen.
    """
    k = len(acc)
    if k < 2 or any(len(row) != k for row in acc):
        return None
    if len(initial) != k:
        raise ValueError(f"initial accuracy has {len(initial)} entries for {k} tasks")
    return sum(acc[i][i - 1] - initial[i] for i in range(1, k)) / (k - 1)


def forgetting(acc: Matrix) -> list[float | None]:
    """Per-task forgetting: max over j in [i, K) of a[i][j] minus a[i][K]; None for the last task."""
    k = len(acc)
    if any(len(row) != k for row in acc):
        return [None] * k
    return [max(acc[i][i:k - 1]) - acc[i][k - 1] if i < k - 1 else None for i in range(k)]


def summarize(acc: Matrix, initial: Sequence[float]) -> dict:
    """OP, BWT, FWT and per-task forgetting in one dict (fractions in [0, 1])."""
    return {"op": overall_performance(acc), "bwt": backward_transfer(acc),
            "fwt": forward_transfer(acc, initial), "forgetting": forgetting(acc)}


def plasticity(acc: Matrix, trained_at: Sequence[int] | None = None) -> float:
    """Mean accuracy on each task right after the stage that trained it: mean_i a[i][s(i)].

    ``trained_at[i]`` = s(i), the column of task i's stage (default i: one task per stage). Beside
    OP and BWT it tells learning from keeping: OP = plasticity + (K-1)/K * BWT with one task per stage.
    """
    if not acc:
        raise ValueError("empty accuracy matrix")
    cols = range(len(acc)) if trained_at is None else trained_at
    return sum(row[j] for row, j in zip(acc, cols, strict=True)) / len(acc)


def points(value: float, spec: str = ".1f") -> str:
    """``value`` (already in points) formatted by ``spec``, rounded to 6 decimals first so that every table,
    legend and log line rounds the same exact value the same way: 100 * 0.6375 is 63.74999999999999 in
    floating point, which would print as 63.7 where a mean of the same runs prints 63.8 (halves round to even)."""
    return format(round(value, 6), spec)
