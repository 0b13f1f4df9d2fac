"""When LIME has drawn enough perturbations: the ridge weights' standard errors and a stopping rule.

Adaptive LIME (``explain.lime.adaptive``) draws lime's perturbations in rounds and refits
lime's ridge after each; it stops once the explanation a user reads, the top-k superpixels,
has settled: the same top-k set in the last ``stable_rounds`` refits, and the k-th weight
apart from the (k+1)-th by more than ``z`` standard errors of their difference. That is the
idea of S-LIME (Zhou, Hooker & Wang, KDD 2021: keep sampling until a hypothesis test says
the selected features would not change with more samples) and of BayesLIME (Slack et al.,
NeurIPS 2021: the posterior of the local linear model's weights says how many perturbations
an explanation needs), applied to lime's own fit instead of a new one. Nothing here calls a
model: these are pure numpy functions of the neighbourhood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdaptiveSettings:
    """The stopping rule's parameters (``explain.lime.adaptive``; ``num_samples`` is the cap)."""

    round_size: int = 100
    top_k: int = 5
    stable_rounds: int = 2
    z: float = 1.0


def ridge_standard_errors(
    data: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray, coef: np.ndarray, alpha: float = 1.0
) -> np.ndarray:
    """Standard errors of a weighted ridge fit's coefficients (sklearn ``Ridge(alpha, fit_intercept=True)``).

    The ridge is weighted least squares on the data plus ``p`` pseudo-observations ``sqrt(alpha) * e_j``
    with target 0 (the intercept unpenalised), i.e. the posterior mean under a ``N(0, sigma^2 / alpha)``
    prior on each weight. Its covariance is ``sigma^2 (Xc' W Xc + alpha I)^-1`` (``Xc``: the data
    centred on their weighted means, which is what the unpenalised intercept does), with ``sigma^2``
    the augmented fit's residual variance: ``(sum w r^2 + alpha |coef|^2) / (n - 1)``.
    """
    x = np.asarray(data, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.asarray(sample_weight, dtype=np.float64)
    beta = np.asarray(coef, dtype=np.float64)
    n, p = x.shape
    if n < 2:
        return np.full(p, np.inf)
    total = w.sum()
    x_centred = x - (w @ x) / total
    y_centred = y - (w @ y) / total
    residuals = y_centred - x_centred @ beta
    sigma2 = (w @ residuals**2 + alpha * beta @ beta) / (n - 1)
    gram = (x_centred * w[:, None]).T @ x_centred + alpha * np.eye(p)
    covariance = sigma2 * np.linalg.inv(gram)
    return np.sqrt(np.clip(np.diag(covariance), 0.0, None))


def top_set(weights: np.ndarray, k: int) -> frozenset[int]:
    """The ``k`` superpixels with the largest (signed) weights: the evidence a LIME map shows first."""
    order = np.argsort(-np.asarray(weights), kind="stable")
    return frozenset(int(i) for i in order[:k])


def separated(weights: np.ndarray, std_errors: np.ndarray, k: int, z: float) -> bool:
    """Whether the k-th largest weight exceeds the (k+1)-th by more than ``z`` standard errors of the difference.

    The two weights are treated as independent (their covariance is ignored, as a per-weight
    confidence interval does); with at most ``k`` superpixels there is nothing to separate.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) <= k:
        return True
    order = np.argsort(-weights, kind="stable")
    kth, next_ = order[k - 1], order[k]
    spread = np.hypot(std_errors[kth], std_errors[next_])
    return bool(weights[kth] - weights[next_] > z * spread)


def converged(
    history: list[frozenset[int]], weights: np.ndarray, std_errors: np.ndarray, rule: AdaptiveSettings
) -> bool:
    """The stopping rule: ``history`` (one top-k set per refit so far, the latest last) ends in
    ``stable_rounds`` equal sets and the latest fit separates its k-th weight from the (k+1)-th."""
    if len(history) < rule.stable_rounds or len(set(history[-rule.stable_rounds :])) != 1:
        return False
    return separated(weights, std_errors, rule.top_k, rule.z)
