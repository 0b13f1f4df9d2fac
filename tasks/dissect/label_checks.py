"""Label self-tests: CLIP-Dissect run where every unit's true concept is known.

The final layer (Oikarinen & Weng, ICLR 2023, sec. 4): a classifier's output unit k stands for
class k, so CLIP-Dissect, run on the output units with a concept set, should name each unit's
class. The paper reports two numbers, both computed here per concept set:

- accuracy: the share of output units whose top concept is their own class name (meaningful when
  the concept set holds the class names: the ``classes`` set, and any set that contains them);
- text similarity: the mean cosine, in the CLIP text space, between each unit's label and its
  class name (the reference code's ``utils.get_cos_similarity``; 1 when the label is the class).

A label that ties other concepts (``tied_with``, :mod:`xai_audit.tasks.dissect.ties`) is a pick by rounding,
not a decision: soft-WPMI with λ = 1 caps every score at log(#units), which a layer of 5 output
units reaches for several concepts at once. ``class_in_tie`` says whether the class is the label
or one of the concepts tied with it.

The output units' "activations" are the classifier's outputs on the probe set, unpooled, as the
reference code records them (a forward hook on the final ``fc`` layer, whose 2-D output
``get_activation`` passes through as it is).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch.nn.functional as F
from torch import Tensor, nn

from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.dissect.ties import DEFAULT_TIE_TOLERANCE, tied_concepts

CHECK_FINAL_LAYER = "final_layer"


def output_layer(module: nn.Module, n_classes: int) -> str:
    """The name of the classifier's output layer: its last ``nn.Linear`` with one output per class
    (torchvision's ``fc``/``classifier.N``, timm's ``head``); a ConfigError when there is none."""
    linear = [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and name]
    if not linear or module.get_submodule(linear[-1]).out_features != n_classes:
        found = f"the last is {linear[-1]!r}" if linear else "there is none"
        raise ConfigError(
            "models.class_names",
            f"the final-layer check needs a last nn.Linear with {n_classes} outputs (one per class); {found}",
        )
    return linear[-1]


def final_layer_rows(
    scores: Tensor,
    concepts: Sequence[str],
    class_names: Sequence[str],
    concept_text: Tensor,
    class_text: Tensor,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
) -> pd.DataFrame:
    """One row per output unit: its class, CLIP-Dissect's label, whether they match, their text cosine.

    ``scores`` ``[n_classes, n_concepts]`` are the similarity function's unit × concept scores;
    ``concept_text`` ``[n_concepts, d]`` and ``class_text`` ``[n_classes, d]`` the CLIP text
    embeddings of the concepts and class names (same template). The label is the first best
    concept; concepts within ``tie_tolerance`` of it are listed in ``tied_with``.
    """
    if scores.shape != (len(class_names), len(concepts)):
        raise ValueError(
            f"scores {tuple(scores.shape)} must be [n_classes={len(class_names)}, n_concepts={len(concepts)}]"
        )
    best_scores, best = scores.float().nan_to_num(nan=float("-inf")).max(dim=1)
    text = F.normalize(concept_text.float(), dim=-1)[best] * F.normalize(class_text.float(), dim=-1)
    labels = [concepts[i] for i in best.tolist()]
    ties = tied_concepts(scores, concepts, best, tie_tolerance)
    same = [
        {name.strip().lower()} & {c.strip().lower() for c in [label, *tied]}
        for name, label, tied in zip(class_names, labels, ties)
    ]
    frame = pd.DataFrame(
        {
            "unit": range(len(class_names)),
            "class_name": list(class_names),
            "concept": labels,
            "score": best_scores.numpy(),
            "correct": [label.strip().lower() == name.strip().lower() for label, name in zip(labels, class_names)],
            "text_similarity": text.sum(dim=1).numpy(),
            "tied_with": ties,
            "class_in_tie": [bool(match) for match in same],
        }
    )
    return frame.astype({"unit": "int32", "score": "float32", "text_similarity": "float32"})


def final_layer_accuracy(rows: pd.DataFrame) -> tuple[float, float]:
    """(accuracy, mean text similarity) of :func:`final_layer_rows`."""
    return float(rows["correct"].mean()), float(rows["text_similarity"].mean())
