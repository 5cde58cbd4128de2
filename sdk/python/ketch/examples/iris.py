"""A scikit-learn logistic regression on the iris data set (shipped with scikit-learn).

    ketch model serve ketch.examples.iris:model --name iris --version 1 --replicas 2

Training is deterministic and takes a few milliseconds, so every replica that imports
this module serves the same model, and a test can compute the expected answers itself.
"""

from __future__ import annotations

from functools import lru_cache

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ketch.models import SklearnModel


@lru_cache(maxsize=1)
def estimator():
    data = load_iris()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    return clf.fit(data.data, data.target)


def features():
    """The iris feature rows (150 x 4, float64)."""
    return load_iris().data


def model() -> SklearnModel:
    """Factory used by ``ketch model serve``: predicts the class index (0, 1, 2)."""
    return SklearnModel(estimator())
