"""What `kubectl describe` and `dpo run` tell a user to serve a promoted adapter with vLLM."""

from __future__ import annotations

import json
import shlex

import pytest
from dpo_operator.api import DPOJob, PromotionStatus
from dpo_operator.core.serving import vllm_max_lora_rank, with_vllm_instructions
from dpo_operator.core.validate import parse_dpojob

from tests.conftest import minimal_manifest, set_fields

PROMOTED = PromotionStatus(
    version="demo-ab12", uri="s3://models/demo/versions/demo-ab12", digest="sha256:ab12"
)


def job_with(**fields: object) -> DPOJob:
    return parse_dpojob(set_fields(minimal_manifest(), **fields))


@pytest.mark.parametrize(("rank", "flag"), [(1, 8), (8, 8), (16, 16), (17, 32), (300, 320)])
def test_the_max_lora_rank_is_the_smallest_vllm_takes_that_fits(rank: int, flag: int) -> None:
    assert vllm_max_lora_rank(rank) == flag


def test_the_serve_line_names_the_served_base_model_and_the_promoted_version() -> None:
    job = job_with(
        **{
            "peft.r": 16,
            "promotion": {"target": "s3://models/demo", "servedModelName": "llama-3.1-8b"},
        }
    )
    status = with_vllm_instructions(job, PROMOTED)
    assert status.vllm_serve is not None
    assert shlex.split(status.vllm_serve) == [
        "vllm",
        "serve",
        "llama-3.1-8b",
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--lora-modules",
        f"demo-ab12={PROMOTED.uri}",
    ]
    assert status.vllm_load_request is not None
    request = shlex.split(status.vllm_load_request)
    assert request[3].endswith("/v1/load_lora_adapter")
    assert json.loads(request[-1]) == {"lora_name": "demo-ab12", "lora_path": PROMOTED.uri}


def test_without_a_served_name_the_base_is_the_model_trained() -> None:
    job = job_with(promotion={"target": "s3://models/demo"})
    status = with_vllm_instructions(job, PROMOTED)
    assert status.vllm_serve is not None
    assert shlex.split(status.vllm_serve)[2] == job.spec.model.name


def test_a_full_fine_tune_gets_no_lora_line() -> None:
    job = job_with(**{"peft.enabled": False, "promotion": {"target": "s3://models/demo"}})
    assert with_vllm_instructions(job, PROMOTED).vllm_serve is None


def test_an_oci_adapter_is_pulled_verified_beside_vllm_before_it_is_served() -> None:
    target = "oci://registry.ml.svc:5000/team/adapters"
    job = job_with(promotion={"target": target, "plainHttp": True})
    promoted = PromotionStatus(
        version="demo-ab12", uri=f"{target}@sha256:{'0' * 64}", digest="sha256:ab12"
    )
    status = with_vllm_instructions(job, promoted)
    assert status.vllm_serve is not None
    pull, serve = status.vllm_serve.split(" && ")
    assert shlex.split(pull) == [
        "dpo",
        "pull",
        promoted.uri,
        "adapters/demo-ab12",
        "--plain-http",
    ]
    assert shlex.split(serve)[-1] == "demo-ab12=adapters/demo-ab12"
    assert status.vllm_load_request is not None
    body = json.loads(shlex.split(status.vllm_load_request)[-1])
    assert body == {"lora_name": "demo-ab12", "lora_path": "adapters/demo-ab12"}


def test_each_promoted_version_is_served_under_its_own_name() -> None:
    """A new version never reloads under the name of the one before (vLLM would reuse the old
    adapter's prefix-cache blocks)."""
    job = job_with(promotion={"target": "s3://models/demo"})
    later = PROMOTED.model_copy(
        update={"version": "demo-cd34", "uri": "s3://models/demo/versions/demo-cd34"}
    )
    names = set()
    for promoted in (PROMOTED, later):
        request = with_vllm_instructions(job, promoted).vllm_load_request
        assert request is not None
        names.add(json.loads(shlex.split(request)[-1])["lora_name"])
    assert names == {"demo-ab12", "demo-cd34"}
