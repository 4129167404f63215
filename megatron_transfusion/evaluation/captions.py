"""Caption metrics as the COCO caption evaluation computes them (pycocoevalcap): corpus
BLEU-4 with the closest reference length, and CIDEr-D (tf-idf n-gram cosine with clipping
and a Gaussian length penalty, ×10). Re-implemented to avoid its Java tokenizer; checked
against pycocoevalcap on the same tokenised captions in the tests."""

from __future__ import annotations

import math
import re
from collections import Counter

N = 4


def tokenize(caption: str) -> str:
    """Lower case, punctuation dropped, single spaces (what PTBTokenizer leaves here)."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", caption.lower()))


def _ngrams(sentence: str) -> Counter:
    words = sentence.split()
    return Counter(
        tuple(words[i : i + k]) for k in range(1, N + 1) for i in range(len(words) - k + 1)
    )


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4: clipped n-gram precisions summed over the corpus, geometric mean,
    brevity penalty against each hypothesis's closest reference length."""
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's smoothing, so empty counts give 0, not NaN
    correct, guess = [0] * N, [0] * N
    test_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        counts = _ngrams(hypothesis)
        max_ref = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref)
        length = len(hypothesis.split())
        test_length += length
        reference_length += min((abs(len(r.split()) - length), len(r.split())) for r in refs)[1]
        for k in range(N):
            guess[k] += max(0, length - k)
        for ngram, count in counts.items():
            correct[len(ngram) - 1] += min(max_ref[ngram], count)
    score = 1.0
    for k in range(N):
        score *= (correct[k] + tiny) / (guess[k] + small)
    score **= 1 / N
    ratio = (test_length + tiny) / (reference_length + small)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def cider_d(hypotheses: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """Mean CIDEr-D; document frequencies come from the references of this corpus."""
    refs_counts = [[_ngrams(r) for r in refs] for refs in references]
    document_frequency = Counter(ngram for refs in refs_counts for ngram in set().union(*refs))
    log_corpus = math.log(len(references))

    def vector(counts: Counter):
        vec = [{} for _ in range(N)]
        norm = [0.0] * N
        for ngram, tf in counts.items():
            weight = tf * (log_corpus - math.log(max(1.0, document_frequency[ngram])))
            vec[len(ngram) - 1][ngram] = weight
            norm[len(ngram) - 1] += weight**2
        # coco-caption's length is the number of bigrams (its `n == 1` on 0-based n); kept
        # so scores are comparable with published CIDEr-D.
        length = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hypothesis, refs in zip(hypotheses, refs_counts, strict=True):
        vec, norm, length = vector(_ngrams(hypothesis))
        total = [0.0] * N
        for ref in refs:
            vec_ref, norm_ref, length_ref = vector(ref)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(N):
                value = sum(
                    min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0)
                    for g, w in vec[k].items()
                )
                if norm[k] and norm_ref[k]:
                    value /= norm[k] * norm_ref[k]
                total[k] += value * penalty
        scores.append(10.0 * sum(total) / N / len(refs))
    return sum(scores) / len(scores)
