"""Config name -> neuron labeller: the one place that lists the labelling methods.

A new method is one :class:`~xai_audit.tasks.dissect.base.Labeller` subclass plus one entry in
:data:`LABELLERS`.
"""

from __future__ import annotations

from typing import Any

from xai_audit.tasks.core.config import AuditConfig
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.dissect.base import Labeller, Labels
from xai_audit.tasks.dissect.probe import Probe
from xai_audit.tasks.dissect.stage import (
    clip_dissect_pass_layers,
    clip_similarity,
    concept_set,
    finite_clip_dissect_rows,
    label_sources,
    netdissect_rows,
    nonfinite_activation_row,
    pooled_layer_activations,
)


class ClipDissect(Labeller):
    """CLIP-Dissect (Oikarinen & Weng, ICLR 2023): pooled unit activations matched to CLIP's
    image-concept similarities on the probe set, one layer per work unit."""

    name = "clip_dissect"
    fan_out = "layer"

    def label(self, config: AuditConfig, model: Any, all_layers: list[str], layers: list[str], probe: Probe) -> Labels:
        pass_layers = clip_dissect_pass_layers(config, model, all_layers)  # the final-layer check reads this pass
        activations = pooled_layer_activations(config, model, pass_layers, probe)
        concepts, categories = concept_set(config, probe, model.class_names)
        similarity = clip_similarity(config, probe, concepts)
        labels = Labels({})
        sources = label_sources(config, probe, self.name, len(concepts))
        for layer in layers:
            frame, errors = finite_clip_dissect_rows(
                config, similarity, activations[layer], probe, concepts, categories, model.name, layer
            )
            labels.frames[layer] = frame.assign(**sources)
            labels.errors += errors
        return labels


class NetDissect(Labeller):
    """Network Dissection (Bau et al., CVPR 2017): IoU of thresholded unit maps with concept masks,
    every layer from shared passes over the probe set."""

    name = "netdissect"
    fan_out = "model"

    def label(self, config: AuditConfig, model: Any, all_layers: list[str], layers: list[str], probe: Probe) -> Labels:
        nonfinite: dict[str, None] = {}
        frames = netdissect_rows(config, model, layers, probe, nonfinite)
        wanted = config.dissect.netdissect.categories
        masks = sum(  # label 0 is Broden's "-", no concept
            number != 0 and (wanted is None or category in wanted)
            for number, category in probe.broden().label_category.items()
        )
        sources = label_sources(config, probe, self.name, masks)
        frames = {layer: frame.assign(**sources) for layer, frame in frames.items()}
        errors = [
            nonfinite_activation_row(
                model.name,
                image_id,
                f"NaN/Inf activations in {', '.join(layers)}; image left out of Network Dissection",
            )
            for image_id in nonfinite
        ]
        return Labels(frames, errors)


LABELLERS: dict[str, Labeller] = {labeller.name: labeller for labeller in (ClipDissect(), NetDissect())}
"""Every labelling method by config name."""


def labeller(name: str) -> Labeller:
    """The labeller of ``name``; ConfigError naming the valid ones otherwise."""
    try:
        return LABELLERS[name]
    except KeyError:
        raise ConfigError(
            "dissect.methods", f"unknown method {name!r}; valid: {', '.join(sorted(LABELLERS))}"
        ) from None
