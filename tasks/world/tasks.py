"""Prefect tasks that build the synthetic world and train its models (cached: cheap when warm)."""

from __future__ import annotations

from prefect import task

from xai_audit.tasks.core.config import AuditConfig


@task(name="synthetic-world", task_run_name="world seed {config.world.seed}")
def world_task(config: AuditConfig) -> str:
    """Generate (or find cached) the config's synthetic world; returns its Broden root."""
    from xai_audit.tasks.world.synthetic import ensure_world

    return str(ensure_world(config.world))


@task(name="train-demo-model", task_run_name="train demo model", tags=["gpu"], retries=1)
def demo_model_task(config: AuditConfig) -> str:
    """Train (or find cached) the demo ResNet18 of the config's world; returns its folder."""
    from xai_audit.tasks.world.demo_model import ensure_demo_model

    return str(ensure_demo_model(config.world))


@task(name="train-toy-clip", task_run_name="train toy CLIP", tags=["gpu"], retries=1)
def toy_clip_task(config: AuditConfig) -> str:
    """Train (or find cached) the toy CLIP of the config's world; returns its checkpoint."""
    from xai_audit.tasks.world.toy_clip import ensure_toy_clip

    return str(ensure_toy_clip(config.world))


def prepare_world(config: AuditConfig, stages: tuple[str, ...]) -> None:
    """Run the preparation tasks the stages need, before any work unit asks for their results."""
    uses_demo = any(model.source == "demo" for model in config.models)
    dissect = config.dissect
    dissecting = dissect.enabled and "dissect" in stages
    explaining = config.explain.enabled and "explain" in stages
    if uses_demo or (explaining and config.images.kind == "world") or (dissecting and dissect.probe.kind == "world"):
        world_task(config)
    if uses_demo:
        demo_model_task(config)
    if (
        dissecting
        and "clip_dissect" in dissect.methods
        and dissect.clip.model == "xai-toy-clip"
        and dissect.clip.pretrained is None
    ):
        toy_clip_task(config)
