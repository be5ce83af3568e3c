"""Renders a DPOJob into the Kubernetes objects that run it, one module per child kind. Pure: no
API calls. What a pod receives is the pod contract of `dpo_contract`.
"""

from dpo_operator.core.render.children import (
    render_all,
    render_child,
)
from dpo_operator.core.render.config_map import (
    render_config_map,
)
from dpo_operator.core.render.evaluation import (
    eval_gpus,
    eval_memory,
    render_eval_job,
)
from dpo_operator.core.render.manifest import (
    Manifest,
    to_yaml,
)
from dpo_operator.core.render.network_policy import (
    render_network_policy,
)
from dpo_operator.core.render.pod import (
    COMPLETION_INDEX_FIELD,
    RUN_AS_USER,
    TRAINER_CONTAINER,
)
from dpo_operator.core.render.promotion import (
    render_promote_job,
)
from dpo_operator.core.render.service import (
    render_service,
)
from dpo_operator.core.render.trainer_config import (
    trainer_config,
)
from dpo_operator.core.render.training import (
    KUEUE_SLICE_SIZE_ANNOTATION,
    KUEUE_SLICE_TOPOLOGY_ANNOTATION,
    KUEUE_TOPOLOGY_ANNOTATIONS,
    contract_env,
    kueue_topology_annotations,
    launch_command,
    render_training_job,
)

__all__ = [
    "COMPLETION_INDEX_FIELD",
    "KUEUE_SLICE_SIZE_ANNOTATION",
    "KUEUE_SLICE_TOPOLOGY_ANNOTATION",
    "KUEUE_TOPOLOGY_ANNOTATIONS",
    "RUN_AS_USER",
    "TRAINER_CONTAINER",
    "Manifest",
    "contract_env",
    "eval_gpus",
    "eval_memory",
    "kueue_topology_annotations",
    "launch_command",
    "render_all",
    "render_child",
    "render_config_map",
    "render_eval_job",
    "render_network_policy",
    "render_promote_job",
    "render_service",
    "render_training_job",
    "to_yaml",
    "trainer_config",
]
