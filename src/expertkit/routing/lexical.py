"""Lexical router: TF-IDF over character n-grams + multinomial logistic regression (scikit-learn).

Character n-grams (within word boundaries) see punctuation, operators and
markup that word tokens drop, which is what tells a line of code or a wiki
heading from prose. The fitted state is plain arrays (vocabulary, idf, weights),
saved as JSON/safetensors and rebuilt with a fixed-vocabulary CountVectorizer,
so nothing is pickled.
"""

from __future__ import annotations

import numpy as np
import torch

from expertkit.errors import ExpertkitError
from expertkit.routing.base import Prompts, Router, TrainingData, register_router

VECTORIZER = {"analyzer": "char_wb", "ngram_range": (1, 4), "lowercase": True}
MAX_FEATURES = 40000


def _counts(vocabulary: dict[str, int], texts: list[str]):
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(vocabulary=vocabulary, **VECTORIZER).transform(texts)


def _tfidf(counts, idf: np.ndarray):
    """Sublinear tf x idf, rows L2-normalised: what TfidfVectorizer(sublinear_tf=True) computes."""
    from sklearn.preprocessing import normalize

    counts = counts.astype(np.float64)
    counts.data = 1.0 + np.log(counts.data)
    return normalize(counts.multiply(idf.reshape(1, -1)).tocsr())


@register_router("lexical")
class LexicalRouter(Router):
    needs_model = False

    @classmethod
    def fit(cls, pool, data: TrainingData, settings) -> "LexicalRouter":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        present = sorted(set(data.targets.tolist()))
        if len(present) < 2:
            raise ExpertkitError("a lexical router needs text for at least two labels; add experts or a general corpus")
        vectorizer = TfidfVectorizer(sublinear_tf=True, max_features=MAX_FEATURES, dtype=np.float64, **VECTORIZER)
        features = vectorizer.fit_transform(data.prompts.texts)
        # balanced: the base's class gathers general text and prompt files, and may outnumber an expert's many times
        model = LogisticRegression(C=10.0, max_iter=1000, class_weight="balanced").fit(features, data.targets.numpy())
        coef = np.zeros((len(data.labels), features.shape[1]))
        intercept = np.full(len(data.labels), -1e4)  # a label without training text is never predicted
        weights, biases = model.coef_, model.intercept_
        if len(model.classes_) == 2:  # binary LR keeps one row (class 1 vs class 0): make it two softmax rows
            weights = np.vstack([np.zeros_like(weights[0]), weights[0]])
            biases = np.array([0.0, biases[0]])
        coef[model.classes_], intercept[model.classes_] = weights, biases
        vocabulary = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
        tensors = {"idf": torch.from_numpy(vectorizer.idf_), "coef": torch.from_numpy(coef),
                   "intercept": torch.from_numpy(intercept)}
        return cls(data.labels, tensors, {"vocabulary": vocabulary})

    def probabilities(self, pool, prompts: Prompts, settings) -> torch.Tensor:
        features = _tfidf(_counts(self.params["vocabulary"], prompts.texts), self.tensors["idf"].numpy())
        logits = features @ self.tensors["coef"].numpy().T + self.tensors["intercept"].numpy()
        return torch.softmax(torch.from_numpy(np.asarray(logits)), dim=-1).float()
