"""Scikit-learn logistic regressions on synthetic data (no download).

ketch model serve ketch.examples.linear:model --name linear --input-shape 100
ketch model serve ketch.examples.linear:model20 --name linear20 --input-shape 20
"""

from __future__ import annotations

from functools import lru_cache

from ketch.models import SklearnModel


@lru_cache(maxsize=4)
def data(n_features: int = 100):
    from sklearn.datasets import make_classification

    return make_classification(
        n_samples=2000, n_features=n_features, n_informative=min(20, n_features // 2), random_state=0
    )


@lru_cache(maxsize=4)
def estimator(n_features: int = 100):
    from sklearn.linear_model import LogisticRegression

    x, y = data(n_features)
    return LogisticRegression(max_iter=1000).fit(x, y)


def model() -> SklearnModel:
    """Logistic regression on 100 features."""
    return SklearnModel(estimator(100))


def model20() -> SklearnModel:
    """Logistic regression on 20 features."""
    return SklearnModel(estimator(20))
