"""Helpers of the shipped task YAMLs: lm-eval's own HellaSwag preprocessing (hellaswag_local prompts exactly
as lm-eval's hellaswag), and SQuAD v1.1's nested JSON flattened and scored (squad_local) with the official
SQuAD v1.1 evaluation script's functions (https://rajpurkar.github.io/SQuAD-explorer/, evaluate-v1.1.py),
kept here as that script writes them rather than imported from lamina."""

import re
import string
from collections import Counter
from typing import Any

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs

__all__ = ["process_docs", "squad_docs", "squad_results"]


def squad_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """One row per question (title, context, question, answers) from SQuAD's articles."""
    rows = [
        {"title": article["title"], "context": para["context"], "question": qa["question"],
         "answers": [a["text"] for a in qa["answers"]]}
        for article in dataset for para in article["paragraphs"] for qa in para["qas"]
    ]  # fmt: skip
    return datasets.Dataset.from_list(rows)


# -- evaluate-v1.1.py ------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text: str) -> str:
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn: Any, prediction: str, ground_truths: list[str]) -> float:
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


def squad_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """exact_match and f1 of the generated answer, each the best over the question's references."""
    prediction = results[0]
    return {
        "exact_match": float(metric_max_over_ground_truths(exact_match_score, prediction, doc["answers"])),
        "f1": float(metric_max_over_ground_truths(f1_score, prediction, doc["answers"])),
    }
