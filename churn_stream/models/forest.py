"""The random forest (scikit-learn), scored without ``predict_proba``'s per-call overhead.

``RandomForestClassifier.predict_proba`` dispatches through joblib and validates its input on
every call: 15 to 40 ms even for one row. Both paths here give its probabilities exactly
(the invariant tests compare): small batches walk all trees at once through packed node
arrays, one numpy step per level (0.16 ms for one row, against 4 ms tree by tree); large
batches call each tree's compiled ``tree_.predict``, which wins once rows fill the vectors.

A fitted forest crosses from the training process to the serving one as its trees' node
arrays (``parts``), from which ``from_parts`` rebuilds scikit-learn's compiled trees.
"""

from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.tree._tree import Tree

FOREST_PARAMS = {
    "n_estimators": 100,
    "max_depth": 12,
    "min_samples_leaf": 10,
    "max_features": "sqrt",
    "max_samples": 0.5,
    "n_jobs": 2,
}
LEAF = -1
PACKED_MAX_ROWS = 64
"""Batches up to this size take the packed walk; larger ones go tree by tree."""


class Forest:
    """A fitted forest; ``predict`` is the probability of churn (mean of the trees' fractions).

    ``estimator`` is scikit-learn's own forest where it was fitted, None where the forest was
    rebuilt from its parts.
    """

    def __init__(self, trees: list[Tree], positive: int,
                 estimator: RandomForestClassifier | None = None) -> None:
        self.estimator = estimator
        offsets = np.cumsum([0] + [t.node_count for t in trees])
        self._trees, self._positive = trees, positive
        self.roots = offsets[:-1].astype(np.int64)
        self.depth = max(t.max_depth for t in trees)
        parts = [self._pack(t, offset, positive) for t, offset in zip(trees, offsets, strict=False)]
        self.feature, self.threshold, self.left, self.right, self.value = (
            np.concatenate(column) for column in zip(*parts, strict=True))

    @classmethod
    def from_estimator(cls, estimator: RandomForestClassifier) -> "Forest":
        positive = int(np.flatnonzero(estimator.classes_ == 1)[0])
        return cls([tree.tree_ for tree in estimator.estimators_], positive, estimator)

    def parts(self) -> dict[str, Any]:
        """The trees as plain data: shapes and node arrays (no estimator object)."""
        return {"positive": self._positive,
                "trees": [(tree.n_features, np.asarray(tree.n_classes), tree.n_outputs,
                           tree.__getstate__()) for tree in self._trees]}

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> "Forest":
        """The forest ``parts`` describes; it predicts exactly as the one it came from."""
        trees = []
        for n_features, n_classes, n_outputs, state in parts["trees"]:
            tree = Tree(n_features, np.asarray(n_classes, dtype=np.intp), n_outputs)
            tree.__setstate__(state)
            trees.append(tree)
        return cls(trees, parts["positive"])

    @staticmethod
    def _pack(tree, offset: int, positive: int) -> tuple[np.ndarray, ...]:
        leaf = tree.children_left == LEAF
        own = np.arange(tree.node_count) + offset
        # A leaf points at itself and always goes left, so every walk can take `depth` steps.
        feature = np.where(leaf, 0, tree.feature).astype(np.int64)
        threshold = np.where(leaf, np.inf, tree.threshold)
        left = np.where(leaf, own, tree.children_left + offset)
        right = np.where(leaf, own, tree.children_right + offset)
        counts = tree.value[:, 0, :]
        value = counts[:, positive] / counts.sum(axis=1)
        return feature, threshold, left, right, value

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Churn probability of each row (compared as float32, as the trees were grown)."""
        rows = np.ascontiguousarray(X, dtype=np.float32)
        if len(rows) > PACKED_MAX_ROWS:
            return self.predict_by_tree(rows)
        return self.predict_packed(rows)

    def predict_by_tree(self, rows: np.ndarray) -> np.ndarray:
        total = np.zeros(len(rows))
        for tree in self._trees:
            fractions = tree.predict(rows)
            total += fractions[:, self._positive] / fractions.sum(axis=1)
        return total / len(self._trees)

    def predict_packed(self, rows: np.ndarray) -> np.ndarray:
        node = np.repeat(self.roots[:, None], len(rows), axis=1)
        column = np.arange(len(rows))[None, :]
        for _ in range(self.depth):
            goes_left = rows[column, self.feature[node]] <= self.threshold[node]
            node = np.where(goes_left, self.left[node], self.right[node])
        return self.value[node].mean(axis=0)


def fit_forest(X: np.ndarray, y: np.ndarray, seed: int) -> Forest:
    """Grow the forest on ``X``, ``y``; the seed fixes the bootstrap and the split search."""
    estimator = RandomForestClassifier(random_state=seed, **FOREST_PARAMS)
    estimator.fit(X, y)
    estimator.n_jobs = 1
    return Forest.from_estimator(estimator)
