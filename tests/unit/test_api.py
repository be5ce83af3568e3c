"""The DPOJob API: defaults that work, every TRL loss type, and errors a user can act on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from dpo_contract.fields import DPO_LOSS_TYPES
from dpo_operator.api import describe_errors
from dpo_operator.core.validate import parse_dpojob
from pydantic import ValidationError

from tests.conftest import job_with, minimal_manifest

Manifest = dict[str, Any]


def errors_of(manifest: Manifest) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        parse_dpojob(manifest)
    return describe_errors(caught.value)


def test_minimal_job_gets_working_defaults() -> None:
    spec = job_with().spec
    assert spec.dpo.beta == 0.1
    assert spec.dpo.loss_type == ["sigmoid"]
    assert spec.dpo.precompute_ref_log_probs is False
    assert spec.peft.enabled is True
    assert spec.learning_rate == 1e-5
    assert spec.resources.nodes == 1
    assert spec.network.profile == "tcp"
    assert spec.eval_gate.enabled is True


def test_full_fine_tune_defaults_to_a_smaller_learning_rate() -> None:
    assert job_with(peft={"enabled": False}).spec.learning_rate == 1e-6


def test_explicit_learning_rate_wins_over_the_default() -> None:
    assert job_with(dpo={"learningRate": 3e-6}).spec.learning_rate == 3e-6


def test_precomputed_reference_log_probs_are_one_field_away() -> None:
    assert job_with(dpo={"precomputeRefLogProbs": True}).spec.dpo.precompute_ref_log_probs


@pytest.mark.parametrize("loss", DPO_LOSS_TYPES)
def test_every_loss_type_of_trl_dpoconfig_is_accepted(loss: str) -> None:
    assert job_with(dpo={"lossType": [loss]}).spec.dpo.loss_type == [loss]


def test_losses_combine_with_weights_for_rpo() -> None:
    dpo = job_with(dpo={"lossType": ["sigmoid", "sft"], "lossWeights": [1.0, 0.5]}).spec.dpo
    assert dpo.loss_type == ["sigmoid", "sft"]
    assert dpo.loss_weights == [1.0, 0.5]


def test_simpo_is_selectable_on_its_own() -> None:
    dpo = job_with(dpo={"lossType": ["simpo"], "beta": 2.0, "simpoGamma": 1.0}).spec.dpo
    assert dpo.loss_type == ["simpo"]
    assert dpo.simpo_gamma == 1.0


def test_rare_dpoconfig_fields_pass_through_extra() -> None:
    dpo = job_with(dpo={"extra": {"label_smoothing": 0.1, "warmup_steps": 50}}).spec.dpo
    assert dpo.extra == {"label_smoothing": 0.1, "warmup_steps": 50}


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    """A mutation that sets a dotted path (creating groups on the way)."""

    def mutate(manifest: Manifest) -> None:
        *parents, last = path.split(".")
        node = manifest
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return mutate


def _delete(path: str) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        *parents, last = path.split(".")
        node = manifest
        for part in parents:
            node = node[part]
        del node[last]

    return mutate


def _both(*mutations: Callable[[Manifest], None]) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        for mutation in mutations:
            mutation(manifest)

    return mutate


# (case, mutation, the field path the error must name, what the error must say to do)
BAD_MANIFESTS: list[tuple[str, Callable[[Manifest], None], str, str]] = [
    (
        "oci-target-with-a-tag",
        _set("spec.promotion", {"target": "oci://registry.example/team/adapters:v1"}),
        "spec.promotion.target",
        "an OCI repository (oci://<registry>[:<port>]/<repository>, lower case, no tag)",
    ),
    (
        "oci-target-in-upper-case",
        _set("spec.promotion", {"target": "oci://registry.example/Team/Adapters"}),
        "spec.promotion.target",
        "lower case",
    ),
    ("zero-nodes", _set("spec.resources.nodes", 0), "spec.resources.nodes", ">= 1"),
    ("negative-nodes", _set("spec.resources.nodes", -2), "spec.resources.nodes", ">= 1"),
    ("nodes-not-a-number", _set("spec.resources.nodes", "two"), "spec.resources.nodes", "integer"),
    (
        "too-many-gpus",
        _set("spec.resources.gpusPerNode", 64),
        "spec.resources.gpusPerNode",
        "<= 16",
    ),
    ("unknown-loss", _set("spec.dpo.lossType", ["dpo"]), "spec.dpo.lossType.0", "'sigmoid'"),
    (
        "unknown-loss-by-name",
        _set("spec.dpo.lossType", "sigmod"),
        "spec.dpo.lossType",
        "'sigmod' is not a loss type; use one of sigmoid, hinge",
    ),
    ("loss-not-a-name-or-list", _set("spec.dpo.lossType", {"ipo": 1}), "spec.dpo.lossType", "list"),
    ("zero-beta", _set("spec.dpo.beta", 0), "spec.dpo.beta", "> 0"),
    ("learning-rate-above-one", _set("spec.dpo.learningRate", 2), "spec.dpo.learningRate", "< 1"),
    (
        "simpo-combined",
        _set("spec.dpo.lossType", ["simpo", "sigmoid"]),
        "spec.dpo.lossType",
        "cannot be combined",
    ),
    (
        "weights-mismatch",
        _both(_set("spec.dpo.lossType", ["sigmoid", "sft"]), _set("spec.dpo.lossWeights", [1.0])),
        "spec.dpo.lossWeights",
        "one weight per loss type",
    ),
    (
        "simpo-precompute",
        _set("spec.dpo", {"lossType": ["simpo"], "precomputeRefLogProbs": True}),
        "spec.dpo.precomputeRefLogProbs",
        "no reference",
    ),
    (
        "simpo-with-reference",
        _both(_set("spec.dpo.lossType", ["simpo"]), _set("spec.model.reference", {"name": "r"})),
        "spec.model.reference",
        "remove model.reference",
    ),
    (
        "removed-max-prompt-length",
        _set("spec.dpo.maxPromptLength", 512),
        "spec.dpo.maxPromptLength",
        "set spec.dpo.maxLength",
    ),
    ("removed-rpo-alpha", _set("spec.dpo.rpoAlpha", 0.5), "spec.dpo.rpoAlpha", "[sigmoid, sft]"),
    ("typo-field", _set("spec.dpo.learningrate", 1e-5), "spec.dpo.learningrate", "learningRate"),
    ("unknown-spec-field", _set("spec.gpus", 8), "spec.gpus", "allowed here"),
    (
        "hsdp-on-one-node",
        _set("spec.parallelism.strategy", "hsdp"),
        "spec.parallelism.strategy",
        "use fsdp on one node",
    ),
    (
        "hsdp-one-gpu-per-node",
        _both(_set("spec.parallelism.strategy", "hsdp"), _set("spec.resources.nodes", 2)),
        "spec.parallelism.strategy",
        "gpusPerNode >= 2",
    ),
    (
        "fsdp-on-cpu",
        _both(_set("spec.parallelism.strategy", "fsdp"), _set("spec.resources.gpusPerNode", 0)),
        "spec.parallelism.strategy",
        "use ddp on CPU",
    ),
    (
        "rdma-on-cpu",
        _both(_set("spec.network.profile", "efa"), _set("spec.resources.gpusPerNode", 0)),
        "spec.network.profile",
        "use tcp",
    ),
    ("missing-data", _delete("spec.data"), "spec.data", "required field is missing"),
    ("missing-model", _delete("spec.model"), "spec.model", "required field is missing"),
    (
        "missing-output",
        _delete("spec.output"),
        "spec.output",
        "missing, and this installation sets no default output",
    ),
    (
        "data-name-and-uri",
        _set("spec.data.train", {"name": "org/prefs", "uri": "s3://b/k"}),
        "spec.data.train",
        "exactly one of",
    ),
    ("data-neither", _set("spec.data.train", {"split": "train"}), "spec.data.train", "exactly one"),
    ("bad-memory", _set("spec.resources.memory", "lots"), "spec.resources.memory", "64Gi"),
    ("negative-shm", _set("spec.resources.shmSize", "-1Gi"), "spec.resources.shmSize", "quantity"),
    (
        "bad-gpu-resource",
        _set("spec.resources.gpuResourceName", "nvidia gpu"),
        "spec.resources.gpuResourceName",
        "nvidia.com/gpu",
    ),
    ("local-output", _set("spec.output.uri", "/data/out"), "spec.output.uri", "pvc://<claim>"),
    (
        "hold-out-of-most-of-the-training-pairs",
        _set("spec.data.holdOut.fraction", 0.9),
        "spec.data.holdOut.fraction",
        "0.5",
    ),
    (
        "promotion-without-gate",
        _both(_set("spec.evalGate.enabled", False), _set("spec.promotion", {"target": "s3://m"})),
        "spec.promotion",
        "enable evalGate",
    ),
    (
        "beat-promoted-without-promotion",
        _set("spec.evalGate.mustBeatPromoted", True),
        "spec.evalGate.mustBeatPromoted",
        "set promotion.target",
    ),
    (
        "roce-without-networks",
        _set("spec.network.profile", "roce"),
        "spec.network.secondaryNetworks",
        "Multus",
    ),
    ("bad-nccl-env-name", _set("spec.network.env", {"1NCCL": "x"}), "spec.network.env", "letters"),
    (
        "contract-env-override",
        _set("spec.env", [{"name": "NODE_RANK", "value": "3"}]),
        "spec.env",
        "which the operator sets",
    ),
    (
        "extra-sets-managed-field",
        _set("spec.dpo.extra", {"beta": 0.3}),
        "spec.dpo.extra",
        "spec.dpo",
    ),
    (
        "extra-publishes-to-the-hub",
        _set("spec.dpo.extra", {"push_to_hub": True, "hub_model_id": "x/y"}),
        "spec.dpo.extra",
        "may not set hub_model_id, push_to_hub; allowed, in snake_case",
    ),
    (
        "extra-camel-case",
        _set("spec.dpo.extra", {"labelSmoothing": 0.1}),
        "spec.dpo.extra",
        "snake_case",
    ),
    ("pull-policy", _set("spec.imagePullPolicy", "Sometimes"), "spec.imagePullPolicy", "'Always'"),
    (
        "toleration-operator",
        _set("spec.scheduling.tolerations", [{"key": "k", "operator": "Maybe"}]),
        "spec.scheduling.tolerations.0.operator",
        "'Exists'",
    ),
    ("name-too-long", _set("metadata.name", "x" * 50), "metadata.name", "at most 49"),
    ("name-uppercase", _set("metadata.name", "MyJob"), "metadata.name", "lowercase"),
    ("wrong-api-version", _set("apiVersion", "dpo.dev/v1"), "apiVersion", "dpo.dev/v1alpha1"),
    (
        "restarts-negative",
        _set("spec.runPolicy.maxRestarts", -1),
        "spec.runPolicy.maxRestarts",
        ">= 0",
    ),
]


@pytest.mark.parametrize(
    ("mutation", "path", "advice"),
    [pytest.param(m, p, a, id=case) for case, m, p, a in BAD_MANIFESTS],
)
def test_bad_manifest_error_names_the_field_and_what_to_do(
    mutation: Callable[[Manifest], None], path: str, advice: str
) -> None:
    manifest = minimal_manifest()
    mutation(manifest)
    lines = errors_of(manifest)
    matching = [line for line in lines if line.startswith(f"{path}:")]
    assert matching, f"no error names {path}: {lines}"
    assert any(advice in line for line in matching), f"{path} errors lack {advice!r}: {matching}"


def test_the_bad_manifest_table_is_large_enough() -> None:
    assert len(BAD_MANIFESTS) >= 25


def test_unknown_fields_are_errors_not_dropped() -> None:
    manifest = minimal_manifest()
    manifest["spec"]["model"]["revison"] = "main"
    assert errors_of(manifest) == [
        "spec.model.revison: unknown field; did you mean revision? allowed here: initialize, name, "
        "parameters, reference, revision, trustRemoteCode"
    ]


def test_several_cross_field_problems_are_reported_one_per_line() -> None:
    manifest = minimal_manifest()
    manifest["spec"]["parallelism"] = {"strategy": "hsdp"}
    manifest["spec"]["env"] = [{"name": "MASTER_ADDR", "value": "x"}]
    lines = errors_of(manifest)
    assert len(lines) == 3
    assert sum(line.startswith("spec.parallelism.strategy:") for line in lines) == 2
    assert any(line.startswith("spec.env:") for line in lines)


@pytest.mark.parametrize(
    ("group", "field", "value"),
    [("dpo", "beta", True), ("dpo", "maxSteps", False), ("peft", "r", True)],
)
def test_a_boolean_is_not_a_number(group: str, field: str, value: bool) -> None:
    # The API server refuses `beta: true`; pydantic's lax mode would have read it as 1.0.
    with pytest.raises(ValidationError) as refused:
        job_with(**{group: {field: value}})
    assert f"spec.{group}.{field}" in "\n".join(describe_errors(refused.value))


def test_an_unknown_metadata_field_is_refused_as_the_api_server_refuses_it() -> None:
    manifest = minimal_manifest()
    manifest["metadata"]["unknownField"] = 1
    with pytest.raises(ValidationError) as refused:
        parse_dpojob(manifest)
    assert "metadata: " in "\n".join(describe_errors(refused.value))
    assert "unknown field unknownField" in str(refused.value)
    manifest["metadata"] = {"name": "demo", "resourceVersion": "7", "managedFields": []}
    assert parse_dpojob(manifest).metadata.name == "demo", "what the API server adds is read"
