"""The ConfigMap mounted at /etc/dpo: trainer.json and accelerate.yaml."""

from __future__ import annotations

import yaml
from dpo_contract.pod import ACCELERATE_CONFIG_FILE, TRAINER_CONFIG_FILE

from dpo_operator.core.names import config_map_name
from dpo_operator.core.render.accelerate import accelerate_config
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.render.pod import object_metadata
from dpo_operator.core.render.trainer_config import trainer_config
from dpo_operator.core.resolve import ResolvedJob


def render_config_map(resolved: ResolvedJob) -> Manifest:
    job = resolved.job
    trainer_json = trainer_config(resolved).model_dump_json(by_alias=True, indent=2)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(job, config_map_name(job), "config"),
        "data": {
            TRAINER_CONFIG_FILE: trainer_json + "\n",
            ACCELERATE_CONFIG_FILE: yaml.safe_dump(accelerate_config(resolved), sort_keys=False),
        },
    }
