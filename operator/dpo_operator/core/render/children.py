"""Every child of a DPOJob, and the one a lifecycle `Create` asks for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from dpo_operator.core.render.config_map import render_config_map
from dpo_operator.core.render.evaluation import render_eval_job
from dpo_operator.core.render.initialization import render_init_job
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.render.network_policy import render_network_policy
from dpo_operator.core.render.promotion import render_promote_job
from dpo_operator.core.render.service import render_service
from dpo_operator.core.render.training import render_training_job
from dpo_operator.core.resolve import ResolvedJob
from dpo_operator.core.storage import initializes_model

ChildKind = Literal["config", "service", "network-policy", "init", "train", "eval", "promote"]

# Every kind of child, and its renderer (of a training attempt). A new kind of child is one more
# module here, one more entry, and the lifecycle's Create of it.
RENDERERS: dict[ChildKind, Callable[[ResolvedJob, int], Manifest]] = {
    "config": lambda resolved, _: render_config_map(resolved),
    "service": lambda resolved, _: render_service(resolved),
    "network-policy": lambda resolved, _: render_network_policy(resolved),
    "init": render_init_job,
    "train": render_training_job,
    "eval": render_eval_job,
    "promote": render_promote_job,
}


def children_of(resolved: ResolvedJob) -> list[ChildKind]:
    """The kinds of child `resolved` has, in the order `dpo render` prints them."""
    settings, spec = resolved.settings, resolved.spec
    kinds: list[ChildKind] = ["config", "service"]
    if settings.network_policy and not settings.cpu:
        kinds.append("network-policy")
    if initializes_model(spec):
        kinds.append("init")
    kinds.append("train")
    if spec.eval_gate.enabled:
        kinds.append("eval")
    if spec.promotion is not None:
        kinds.append("promote")
    return kinds


def render_all(resolved: ResolvedJob, attempt: int = 1) -> list[Manifest]:
    """Every child for training attempt `attempt` (what `dpo render` prints)."""
    return [render_child(resolved, kind, attempt) for kind in children_of(resolved)]


def render_child(resolved: ResolvedJob, kind: ChildKind, attempt: int) -> Manifest:
    """The child a lifecycle `Create(kind, attempt)` asks for."""
    return RENDERERS[kind](resolved, attempt)
