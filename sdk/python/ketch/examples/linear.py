"""A scikit-learn logistic regression on 100 features of synthetic data (no download).

ketch model serve ketch.examples.linear:model --name linear --input-shape 100
"""

from __future__ import annotations

from functools import lru_cache

from ketch.models import SklearnModel


@lru_cache(maxsize=1)
def data(n_features: int = 100):
    from sklearn.datasets import make_classification

    return make_classification(n_samples=2000, n_features=n_features, n_informative=20, random_state=0)


@lru_cache(maxsize=1)
def estimator():
    from sklearn.linear_model import LogisticRegression

    x, y = data()
    return LogisticRegression(max_iter=1000).fit(x, y)


def model() -> SklearnModel:
    return SklearnModel(estimator())
