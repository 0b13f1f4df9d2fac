"""Localization against ground-truth masks: pointing game, IoU with the mask, energy inside it."""

from __future__ import annotations

from typing import Any

from xai_audit.tasks.core.config import MetricsConfig
from xai_audit.tasks.metrics.base import Metric, Score, ScoredBatch
from xai_audit.tasks.metrics.maps import localization_row, scaled_tolerance


class Localization(Metric):
    """Each map of each usable image that has a non-empty mask
    (:func:`xai_audit.tasks.metrics.maps.localization_row`)."""

    name = "localization"
    category = "localization"
    table = "localization"
    scores = (
        Score("pointing_hit", "pointing_accuracy", "higher", "pointing accuracy"),
        Score("iou_gt", "iou_gt_mean", "higher", "IoU with the mask"),
        Score("energy_in_gt", "energy_in_gt_mean", "higher", "energy in the mask"),
    )

    def enabled(self, settings: MetricsConfig) -> bool:
        return settings.localization

    def rows(self, batch: ScoredBatch) -> dict[str, list[dict[str, Any]]]:
        settings = batch.settings
        rows = []
        for index in batch.usable.nonzero()[0]:
            mask = batch.gt_masks[index]
            if mask is None or not mask.any():
                continue
            tolerance = scaled_tolerance(max(mask.shape))
            rows += [
                {
                    "model": batch.model_name,
                    "image_id": batch.image_ids[index],
                    "method": method,
                    **localization_row(maps[index], mask, tolerance, settings.agreement_rule, settings.agreement_q),
                }
                for method, maps in batch.maps.items()
                if batch.scored(method)[index]
            ]
        return {self.table: rows}
