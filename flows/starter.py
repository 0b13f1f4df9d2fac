"""``xai-audit init``: a commented starter config for a user's model file and image folder.

The config it writes is explain-only: neuron labelling needs a probe set and concepts of the model's
own domain, which init cannot know (the synthetic world's would label a photo classifier's units with
coloured shapes), so ``dissect`` is off and a comment says how to turn it on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from xai_audit.tasks.core.callables import names_file, split_target
from xai_audit.tasks.core.config import ConfigErrors, parse_config

STARTER_METHODS = ("gradcam", "gradcam++", "layercam", "eigencam", "lime", "control_random")
"""Fast gradient CAMs, LIME, and a map that knows nothing of the model (the floor every metric must rank
the others above)."""

TEMPLATE = """\
# Starter audit of {model_name}, written by `xai-audit init`.
#   xai-audit validate {config}     # checks every field and path, builds the model once
#   xai-audit run {config}          # explains every image; prints where the HTML report is
# Relative paths start at this file's folder. Every option: `xai-audit config-reference`.
name: {name}
device: auto                      # the GPU when there is one
models:
  - name: {model_name}
    source: python
    callable: {callable:<19} # FILE.py:FUNCTION beside this config, or an installed package.module:function
    class_names: {classes:<16} # one name per line, in the order of the model's outputs
    # cam_layer: layer4           # the layer the CAMs read; default: the last convolutional feature map
    preprocess:                   # photo -> input: shorter side resized, centre crop, normalised (ImageNet's)
      resize: {resize}
      crop: {crop}
      mean: [0.485, 0.456, 0.406]
      std: [0.229, 0.224, 0.225]
images:
  kind: folder                    # every image under root, recursively
  root: {images:<25} # the images to explain
explain:
  methods: [{methods}]
  target: predicted               # each map explains the predicted class; {{topk: 2}}: the two most probable
  lime:
    num_samples: 300              # perturbed copies per image: more is steadier and slower
# Neuron labelling (which concept each unit detects) needs a probe set of images with concept masks
# from your model's domain: a Broden-format folder of your own, or Broden itself (broden1_224,
# netdissect.csail.mit.edu/data/broden1_224.zip). init cannot know one, so it is off. To enable:
#   dissect:
#     enabled: true
#     methods: [netdissect]
#     probe: {{kind: broden, root: path/to/broden1_224}}
#     concepts: {{source: broden}}
#   models: [{{..., layers: [layer3, layer4]}}]   # the layers whose units are labelled
dissect:
  enabled: false
"""


def _scalar(value: str) -> str:
    """``value`` as a YAML scalar: plain when YAML reads it back unchanged, else quoted."""
    try:
        plain = yaml.safe_load(value) == value and "#" not in value
    except yaml.YAMLError:
        plain = False
    return value if plain else json.dumps(value)


def _relative(path: Path, folder: Path) -> str:
    """``path`` as the config writes it: relative to the config's folder when below it, else absolute."""
    path = path.resolve()
    return _scalar(path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path))


def starter_config(model: str, images: Path, classes: Path, config: Path, size: int = 224) -> str:
    """The text of a starter config to be written at ``config``; :class:`ConfigErrors` when it would not
    load (a path that does not exist, a bad size), so init never writes a config that fails validation.

    ``model`` is ``FILE.py:FUNCTION`` (a path from the current directory; the file must lie in the
    config's folder, where the config looks for it) or an importable ``package.module:function``.
    """
    folder = config.resolve().parent
    target = model
    if names_file(model):
        location, attr = split_target(model)
        file = Path(location).resolve()
        if not file.is_relative_to(folder):
            raise ConfigErrors(
                [("--model", f"{file} is not in the config's folder {folder}; put it beside {config.name} (--out)")]
            )
        target = f"{file.relative_to(folder).as_posix()}:{attr}"
    model_name = Path(split_target(model)[0]).stem.replace(".", "-") or "model"
    text = TEMPLATE.format(
        name=config.stem,
        config=os.path.relpath(config),
        model_name=model_name,
        callable=_scalar(target),
        classes=_relative(classes, folder),
        images=_relative(images, folder),
        resize=round(size * 256 / 224),
        crop=size,
        methods=", ".join(STARTER_METHODS),
    )
    parse_config(yaml.safe_load(text), base=folder)
    return text
