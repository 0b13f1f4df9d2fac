"""Agreement between methods: IoU of binarised maps, Spearman rank correlation, centre-of-mass distance."""

from __future__ import annotations

from typing import Any

from xai_audit.tasks.metrics.base import Metric, Score, ScoredBatch
from xai_audit.tasks.metrics.maps import agreement_rows


class Agreement(Metric):
    """Every method pair of every usable image (:func:`xai_audit.tasks.metrics.maps.agreement_rows`)."""

    name = "agreement"
    category = "agreement"
    table = "agreement"
    scores = (Score("iou", "agreement_iou_mean", "higher", "IoU with others"),)

    def rows(self, batch: ScoredBatch) -> dict[str, list[dict[str, Any]]]:
        settings = batch.settings
        rows = []
        for index in batch.usable.nonzero()[0]:
            image_maps = {method: maps[index] for method, maps in batch.maps.items() if batch.scored(method)[index]}
            rows += [
                {"model": batch.model_name, "image_id": batch.image_ids[index], **row}
                for row in agreement_rows(image_maps, settings.agreement_rule, settings.agreement_q)
            ]
        return {self.table: rows}
