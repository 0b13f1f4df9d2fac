"""Faithfulness to the model: deletion and insertion AUC (RISE), and ROAD where the explainer allows it."""

from __future__ import annotations

from typing import Any

import numpy as np

from xai_audit.tasks.compute.batch_sizes import configured_batch_size
from xai_audit.tasks.core.config import MetricsConfig
from xai_audit.tasks.core.errors import NonFiniteError
from xai_audit.tasks.core.rows import error_row
from xai_audit.tasks.metrics.base import Metric, Score, ScoredBatch
from xai_audit.tasks.metrics.maps import deletion_insertion
from xai_audit.tasks.metrics.road import road_scores


class Faithfulness(Metric):
    """Deletion/insertion AUC of every map of the usable images (one set of perturbed forwards per
    method) and grad-cam's ROAD when ``explain.metrics.road``; an image whose perturbed outputs are
    not finite gets an ``errors`` row instead of a NaN AUC."""

    name = "faithfulness"
    category = "faithfulness"
    table = "faithfulness"
    scores = (
        Score("deletion_auc", "deletion_auc_mean", "lower", "deletion AUC"),
        Score("insertion_auc", "insertion_auc_mean", "higher", "insertion AUC"),
        Score("road", "road_mean", "higher", "ROAD"),
    )

    def enabled(self, settings: MetricsConfig) -> bool:
        return settings.faithfulness

    def rows(self, batch: ScoredBatch) -> dict[str, list[dict[str, Any]]]:
        settings = batch.settings
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for method, method_maps in batch.maps.items():
            keep = np.flatnonzero(batch.scored(method))
            if not len(keep):
                continue
            images, targets = batch.images[keep], [batch.targets[i] for i in keep]
            deletion, insertion = deletion_insertion(
                batch.module,
                images,
                method_maps[keep],
                targets,
                steps=settings.steps,
                baseline=settings.baseline,
                batch_size=configured_batch_size(settings.batch_size),
                amp_dtype=batch.amp_dtype,
            )
            road = (
                road_scores(batch.module, images, method_maps[keep], targets, settings.road_percentiles, batch.seed)
                if settings.road and method in batch.road_methods
                else np.full(len(keep), np.nan)
            )
            for i, d, n, r in zip(keep, deletion, insertion, road):
                image_id = batch.image_ids[i]
                if np.isfinite(d) and np.isfinite(n):
                    rows.append(
                        {
                            "model": batch.model_name,
                            "image_id": image_id,
                            "method": method,
                            "deletion_auc": float(d),
                            "insertion_auc": float(n),
                            "road": float(r) if np.isfinite(r) else None,
                        }
                    )
                else:  # the model failed on some deleted/inserted image: no AUC rather than a NaN one
                    errors.append(
                        error_row(
                            "explain",
                            batch.model_name,
                            NonFiniteError(
                                image_id,
                                f"{method} faithfulness: the model's output on deleted/inserted images is not finite "
                                "(NaN/Inf)",
                                "NonFiniteMetricError",
                            ),
                        )
                    )
        return {self.table: rows, "errors": errors}
