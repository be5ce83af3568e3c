"""Manifests at the edges of the API's cross-field rules, shared by the unit tier (`dpo validate`,
which evaluates each rule with cel-python) and the cluster tier (the real API server's CEL).

Many lean on defaults the manifest does not spell out (the gate is on unless disabled, one node,
one GPU, sigmoid loss): the API server applies the CRD's defaults before its CEL runs, and
pydantic applies the same defaults, so both must reach the same verdict.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from tests.conftest import MINIMAL, REPO, set_fields


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    document = copy.deepcopy(MINIMAL)
    document["metadata"] = {"name": name, "namespace": "default"}
    return set_fields(document, **spec)


# Cases of the rules over dpo.lossType, which the CRD cannot type (one name or a list) and CEL in
# the API server cannot read: the operator refuses them (a SpecValid condition), not the API server.
OPERATOR_ONLY = {
    "simpo-with-reference",
    "simpo-combined",
    "simpo-precompute",
    "simpo-by-name-with-reference",
    "simpo-by-name-precompute",
    "one-loss-by-name-two-weights",
    "weights-against-default-loss",
}

# (case, manifest, the field the rule names, the message both must give)
BROKEN: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "hsdp-on-one-default-node",
        manifest("rule-a", **{"parallelism.strategy": "hsdp"}),
        "spec.parallelism.strategy",
        "hsdp replicates across nodes and needs resources.nodes > 1; use fsdp on one node",
    ),
    (
        "hsdp-with-one-default-gpu",
        manifest("rule-b", **{"parallelism.strategy": "hsdp", "resources.nodes": 2}),
        "spec.parallelism.strategy",
        "hsdp shards inside a node and needs resources.gpusPerNode >= 2; use ddp otherwise",
    ),
    (
        "fsdp-on-cpu",
        manifest("rule-c", **{"parallelism.strategy": "fsdp", "resources.gpusPerNode": 0}),
        "spec.parallelism.strategy",
        "fsdp shards over GPUs but resources.gpusPerNode is 0; set it >= 1 or use ddp on CPU",
    ),
    (
        "rdma-on-cpu",
        manifest("rule-d", **{"network.profile": "efa", "resources.gpusPerNode": 0}),
        "spec.network.profile",
        "efa moves GPU memory over RDMA but resources.gpusPerNode is 0; set it >= 1 or use tcp",
    ),
    (
        "global-batch-not-a-multiple",
        manifest("rule-gbs-a", **{"dpo.globalBatchSize": 6, "dpo.perDeviceBatchSize": 4}),
        "spec.dpo.globalBatchSize",
        "must be a multiple of dpo.perDeviceBatchSize x the GPUs",
    ),
    (
        "global-batch-and-accumulation",
        manifest("rule-gbs-b", **{"dpo.globalBatchSize": 8, "dpo.gradientAccumulationSteps": 2}),
        "spec.dpo.gradientAccumulationSteps",
        "is derived from dpo.globalBatchSize: set one of them",
    ),
    (
        "promotion-without-gate",
        manifest("rule-f", **{"evalGate.enabled": False, "promotion": {"target": "s3://m"}}),
        "spec.promotion",
        "nothing is promoted without a gate; enable evalGate or remove promotion",
    ),
    (
        "beat-the-promoted-without-promotion",
        manifest("rule-g", **{"evalGate.mustBeatPromoted": True}),
        "spec.evalGate.mustBeatPromoted",
        "compares with the promoted adapter; set promotion.target",
    ),
    (
        "beat-the-promoted-on-a-store-without-a-conditional-write",
        manifest(
            "rule-g2", **{"evalGate.mustBeatPromoted": True, "promotion": {"target": "gs://m"}}
        ),
        "spec.evalGate.mustBeatPromoted",
        "switches the promoted pointer only if it still names the adapter the gate beat, which "
        "needs a pvc:// target (a lock) or an s3:// one (a conditional write); use one, or drop "
        "mustBeatPromoted",
    ),
    (
        "simpo-with-reference",
        manifest("rule-h", **{"dpo.lossType": ["simpo"], "model.reference": {"name": "r"}}),
        "spec.model.reference",
        "simpo is reference-free; remove model.reference",
    ),
    (
        "simpo-combined",
        manifest("rule-i", **{"dpo.lossType": ["simpo", "sft"]}),
        "spec.dpo.lossType",
        "simpo is reference-free and runs through TRL's CPO trainer: it cannot be combined with "
        "other loss types, got simpo, sft",
    ),
    (
        "simpo-precompute",
        manifest("rule-j", **{"dpo.lossType": ["simpo"], "dpo.precomputeRefLogProbs": True}),
        "spec.dpo.precomputeRefLogProbs",
        "simpo uses no reference model, so there are no reference log-probs to precompute",
    ),
    (
        "simpo-by-name-with-reference",
        manifest("rule-h2", **{"dpo.lossType": "simpo", "model.reference": {"name": "r"}}),
        "spec.model.reference",
        "simpo is reference-free; remove model.reference",
    ),
    (
        "simpo-by-name-precompute",
        manifest("rule-j2", **{"dpo.lossType": "simpo", "dpo.precomputeRefLogProbs": True}),
        "spec.dpo.precomputeRefLogProbs",
        "simpo uses no reference model, so there are no reference log-probs to precompute",
    ),
    (
        "one-loss-by-name-two-weights",
        manifest("rule-k2", **{"dpo.lossType": "sigmoid_norm", "dpo.lossWeights": [1.0, 0.5]}),
        "spec.dpo.lossWeights",
        "needs as many entries as lossType: give one weight per loss type",
    ),
    (
        "weights-against-default-loss",
        manifest("rule-k", **{"dpo.lossWeights": [1.0, 0.5]}),
        "spec.dpo.lossWeights",
        "needs as many entries as lossType: give one weight per loss type",
    ),
    (
        "roce-without-networks",
        manifest("rule-l", **{"network.profile": "roce"}),
        "spec.network.secondaryNetworks",
        "profile roce needs them: list the Multus attachments (roce) or GKE networks (tcpxo)",
    ),
    (
        "nccl-env-key",
        manifest("rule-m", **{"network.env": {"1NCCL": "x"}}),
        "spec.network.env",
        "keys must be environment variable names",
    ),
    (
        "contract-env",
        manifest("rule-n", env=[{"name": "MASTER_ADDR", "value": "x"}]),
        "spec.env",
        "may not set the pod contract's variables, which the operator sets",
    ),
    (
        "network-env-master-addr",
        manifest("rule-n2", **{"network.env": {"NCCL_IB_HCA": "mlx5", "MASTER_ADDR": "evil"}}),
        "spec.network.env",
        "may not set the pod contract's variables, which the operator sets",
    ),
    (
        "env-termination-log",
        manifest("rule-n3", env=[{"name": "DPO_TERMINATION_LOG", "value": "/tmp/x"}]),
        "spec.env",
        "may not set the pod contract's variables, which the operator sets",
    ),
    (
        "data-name-and-uri",
        manifest("rule-o", **{"data.train": {"name": "o/d", "uri": "s3://b/k"}}),
        "spec.data.train",
        "set exactly one of name (a hub dataset) or uri (jsonl/parquet files)",
    ),
    (
        "data-neither",
        manifest("rule-p", **{"data.eval": {"split": "test"}}),
        "spec.data.eval",
        "set exactly one of name (a hub dataset) or uri (jsonl/parquet files)",
    ),
    (
        "secret-named-as-contract-env",
        manifest(
            "rule-q",
            secrets=[{"name": "NODE_RANK", "secretKeyRef": {"name": "s", "key": "k"}}],
        ),
        "spec.secrets",
        "may not set the pod contract's variables, which the operator sets",
    ),
    (
        "output-climbs-out-of-its-claim",
        manifest("rule-t", **{"output.uri": "pvc://runs/../../etc"}),
        "spec.output.uri",
        "may not contain '..' (or '.') path segments",
    ),
    (
        "promotion-target-climbs-out",
        manifest("rule-u", promotion={"target": "pvc://models/team-a/.."}),
        "spec.promotion.target",
        "may not contain '..' (or '.') path segments",
    ),
    (
        "data-uri-climbs-out",
        manifest("rule-t1", **{"data.train": {"uri": "pvc://data/../../../etc/shadow"}}),
        "spec.data.train.uri",
        "may not contain '..' (or '.') path segments",
    ),
    (
        "model-path-climbs-out",
        manifest("rule-t2", **{"model.name": "../../root/model"}),
        "spec.model.name",
        "may not contain '..' (or '.') path segments",
    ),
    (
        "output-with-credentials",
        manifest("rule-t3", **{"output.uri": "s3://AKIAKEY:s3cr3t@runs/team"}),
        "spec.output.uri",
        "may not carry credentials (user:secret@)",
    ),
    (
        "promotion-with-credentials",
        manifest("rule-t4", promotion={"target": "s3://robot:token@models/promoted"}),
        "spec.promotion.target",
        "may not carry credentials (user:secret@)",
    ),
    (
        "reference-with-credentials",
        manifest("rule-t5", **{"model.reference": {"name": "s3://k:s@models/sft"}}),
        "spec.model.reference.name",
        "may not carry credentials (user:secret@)",
    ),
    (
        "eval-data-with-credentials",
        manifest("rule-t6", **{"evalGate.data": {"uri": "gs://u:p@held/out.jsonl"}}),
        "spec.evalGate.data.uri",
        "may not carry credentials (user:secret@)",
    ),
    (
        "registry-port-out-of-range",
        manifest("rule-t7", promotion={"target": "oci://registry.example:70000/team/a"}),
        "spec.promotion.target",
        "has a port outside 1..65535",
    ),
    (
        "model-port-out-of-range",
        manifest("rule-t8", **{"model.name": "s3://models.internal:0/sft"}),
        "spec.model.name",
        "has a port outside 1..65535",
    ),
    (
        "data-port-out-of-range",
        manifest("rule-t9", **{"data.train": {"uri": "s3://minio.internal:65536/pairs"}}),
        "spec.data.train.uri",
        "has a port outside 1..65535",
    ),
    (
        "model-name-read-as-a-flag",
        manifest("rule-v1", **{"model.name": "--trust-remote-code"}),
        "spec.model.name",
        "may not start with '-' or hold a space or line break",
    ),
    (
        "model-name-with-a-line-break",
        manifest("rule-v2", **{"model.name": "org/model\nINJECTED: yes"}),
        "spec.model.name",
        "may not start with '-' or hold a space or line break",
    ),
    (
        "gate-that-cannot-fail",
        manifest(
            "rule-v3",
            **{
                "evalGate.minRewardAccuracy": 0.0,
                "evalGate.minRewardMargin": None,
                "evalGate.maxAnchorNllIncrease": None,
            },
        ),
        "spec.evalGate.minRewardAccuracy",
        "0 can never fail (no accuracy is below 0)",
    ),
    (
        "lora-on-embeddings-by-suffix",
        manifest(
            "rule-v4",
            **{"peft.targetModules": ["q_proj", "model.embed_tokens"]},
            promotion={"target": "pvc://models/a"},
        ),
        "spec.peft.targetModules",
        "which PEFT matches too",
    ),
    (
        "toleration-without-key-equal",
        manifest("rule-w1", **{"scheduling.tolerations": [{"operator": "Equal", "value": "x"}]}),
        "spec.scheduling.tolerations",
        "a toleration without a key tolerates every taint and needs operator: Exists",
    ),
    (
        "toleration-exists-with-value",
        manifest(
            "rule-w2",
            **{"scheduling.tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]},
        ),
        "spec.scheduling.tolerations",
        "operator Exists matches any value: remove the value",
    ),
    (
        "toleration-seconds-without-no-execute",
        manifest(
            "rule-w3",
            **{
                "scheduling.tolerations": [
                    {"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 60}
                ]
            },
        ),
        "spec.scheduling.tolerations",
        "tolerationSeconds applies to effect NoExecute only",
    ),
    (
        "node-selector-not-a-label",
        manifest("rule-w4", **{"scheduling.nodeSelector": {"gpu type": "h100"}}),
        "spec.scheduling.nodeSelector",
        "keys must be label keys",
    ),
    (
        "model-from-an-unread-scheme",
        manifest("rule-t10", **{"model.name": "ftp://mirror.example/models/sft"}),
        "spec.model.name",
        "the trainer has no reader for another scheme",
    ),
    (
        "data-from-an-unread-scheme",
        manifest("rule-t11", **{"data.train": {"uri": "https://example.com/pairs.jsonl"}}),
        "spec.data.train.uri",
        "the trainer has no reader for another scheme",
    ),
    (
        "required-topology-without-a-key",
        manifest("rule-u1", **{"scheduling.topologyPolicy": "Required"}),
        "spec.scheduling.topologyPolicy",
        "requires the pods inside one topology group, which scheduling.topologyKey names",
    ),
    (
        "plain-http-to-an-object-store",
        manifest("rule-u2", promotion={"target": "s3://m/adapters", "plainHttp": True}),
        "spec.promotion.plainHttp",
        "talks to an OCI registry without TLS; only an oci:// target has one: remove it",
    ),
    (
        "beat-the-promoted-in-an-oci-repository",
        manifest(
            "rule-u3",
            **{
                "evalGate.mustBeatPromoted": True,
                "promotion": {"target": "oci://registry.example:5000/team/adapters"},
            },
        ),
        "spec.evalGate.mustBeatPromoted",
        "which needs a pvc:// target (a lock) or an s3:// one (a conditional write)",
    ),
    (
        "gate-with-every-criterion-off",
        manifest(
            "rule-v",
            **{
                "evalGate.minRewardAccuracy": None,
                "evalGate.minRewardMargin": None,
                "evalGate.maxAnchorNllIncrease": None,
            },
        ),
        "spec.evalGate",
        "every criterion is off (null), so the gate would pass anything",
    ),
    (
        "metrics-on-the-rendezvous-port",
        manifest("rule-w", **{"monitoring.port": 29500}),
        "spec.monitoring.port",
        "29500 is the rendezvous port (MASTER_PORT) of the training pods",
    ),
    (
        "promoted-rank-vllm-cannot-serve",
        manifest("rule-x", **{"peft.r": 1024, "promotion": {"target": "s3://m"}}),
        "spec.peft.r",
        "a promoted adapter is served by vLLM, whose largest LoRA rank is 512: lower peft.r",
    ),
    (
        "promoted-adapter-of-the-lm-head",
        manifest(
            "rule-y",
            **{"peft.targetModules": ["q_proj", "lm_head"], "promotion": {"target": "s3://m"}},
        ),
        "spec.peft.targetModules",
        "a promoted adapter is served by vLLM, which applies LoRA to linear projection layers "
        "only: remove lm_head, embed_tokens, wte, wpe, embed_in, embed_out (and any name "
        "ending in .<one of them>, which PEFT matches too) from peft.targetModules (all-linear "
        "already leaves the head out)",
    ),
    (
        "name-too-long",
        manifest("q" * 50),
        "metadata.name",
        "must be at most 49 lowercase letters, digits and '-', starting with a letter",
    ),
]

# Just inside each rule: both accept.
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    (
        "hsdp-two-nodes-two-gpus",
        manifest(
            "ok-a",
            **{"parallelism.strategy": "hsdp", "resources.nodes": 2, "resources.gpusPerNode": 2},
        ),
    ),
    ("ddp-on-cpu", manifest("ok-b", **{"parallelism.strategy": "ddp", "resources.gpusPerNode": 0})),
    (
        "global-batch-over-two-nodes",
        manifest(
            "ok-gbs",
            **{
                "dpo.globalBatchSize": 16,
                "dpo.perDeviceBatchSize": 2,
                "resources.nodes": 2,
                "resources.gpusPerNode": 2,
            },
        ),
    ),
    (
        "gate-off-no-held-out",
        manifest("ok-c", **{"evalGate.enabled": False}, data={"train": {"uri": "s3://b/t.jsonl"}}),
    ),
    (
        "gate-data-instead-of-eval",
        manifest(
            "ok-d",
            data={"train": {"uri": "s3://b/t.jsonl"}},
            **{"evalGate.data": {"uri": "s3://b/e.jsonl"}},
        ),
    ),
    ("simpo-alone", manifest("ok-e", **{"dpo.lossType": ["simpo"]})),
    # As TRL takes it (the seed recipes write it so): one name, not a list.
    ("one-loss-by-name", manifest("ok-e3", **{"dpo.lossType": "sigmoid_norm"})),
    (
        "one-loss-by-name-weighted",
        manifest("ok-e4", **{"dpo.lossType": "sigmoid_norm", "dpo.lossWeights": [1.0]}),
    ),
    (
        "promoted-to-an-oci-repository-over-plain-http",
        manifest(
            "ok-e2",
            promotion={"target": "oci://registry.ml.svc:5000/team/adapters", "plainHttp": True},
        ),
    ),
    (
        "rpo-weights",
        manifest("ok-f", **{"dpo.lossType": ["sigmoid", "sft"], "dpo.lossWeights": [1.0, 0.5]}),
    ),
    (
        "roce-with-networks",
        manifest(
            "ok-g",
            **{
                "network.profile": "roce",
                "network.secondaryNetworks": ["net-a"],
                "network.rdmaDevices": 1,
                "network.hcas": ["mlx5_0"],
            },
        ),
    ),
    ("user-env", manifest("ok-h", env=[{"name": "HF_HUB_OFFLINE", "value": "1"}])),
    ("name-49", manifest("r" * 49)),
    (
        "allowed-extra",
        manifest(
            "ok-j", **{"dpo.extra": {"label_smoothing": 0.1, "lr_scheduler_kwargs": {"a": 1}}}
        ),
    ),
    ("dotted-file-names", manifest("ok-k", **{"output.uri": "s3://b/runs.v2/..x/.y"})),
    (
        "one-criterion-left",
        manifest(
            "ok-l", **{"evalGate.minRewardAccuracy": None, "evalGate.maxAnchorNllIncrease": None}
        ),
    ),
    (
        "criteria-off-but-beat-the-champion",
        manifest(
            "ok-m",
            promotion={"target": "s3://m"},
            **{
                "evalGate.minRewardAccuracy": None,
                "evalGate.minRewardMargin": None,
                "evalGate.maxAnchorNllIncrease": None,
                "evalGate.mustBeatPromoted": True,
            },
        ),
    ),
    (
        "default-gate-on-a-hold-out-of-the-training-pairs",
        manifest("ok-e", data={"train": {"uri": "s3://b/t.jsonl"}}),
    ),
    (
        "beat-promoted",
        manifest("ok-i", **{"evalGate.mustBeatPromoted": True, "promotion": {"target": "s3://m"}}),
    ),
    (
        "promoted-at-vllms-largest-rank",
        manifest("ok-j", **{"peft.r": 512, "promotion": {"target": "s3://m"}}),
    ),
    (
        "unpromoted-rank-above-vllms",
        manifest("ok-k", **{"peft.r": 1024, "peft.targetModules": ["lm_head"]}),
    ),
    (
        "promoted-full-fine-tune",
        manifest(
            "ok-l", **{"peft.enabled": False, "peft.r": 1024, "promotion": {"target": "s3://m"}}
        ),
    ),
]


SWEEP: dict[str, Any] = yaml.safe_load((REPO / "examples" / "beta-sweep.yaml").read_text())


def sweep_manifest(
    parameters: list[dict[str, Any]], search: dict[str, Any] | None = None, name: str = "sweep"
) -> dict[str, Any]:
    document = copy.deepcopy(SWEEP)
    document["metadata"] = {"name": name, "namespace": "default"}
    document["spec"]["parameters"] = parameters
    if search is not None:
        document["spec"]["search"] = search
    return document


BETA = [{"field": "dpo.beta", "values": [0.1]}]
# (case, DPOSweep manifest, the line both `dpo validate` and the API server start with); the
# last two are the trials' own problems, which only the operator and `dpo validate` see.
SWEEP_BROKEN: list[tuple[str, dict[str, Any], str]] = [
    (
        "values-and-range",
        sweep_manifest([{"field": "dpo.beta", "values": [0.1], "min": 0.01, "max": 1.0}]),
        "spec.parameters.0: give one of values (a list), lossTypes (names, for dpo.lossType) or "
        "min and max",
    ),
    (
        "empty-range",
        sweep_manifest(
            [{"field": "dpo.beta", "min": 1.0, "max": 0.1}], {"kind": "random", "trials": 2}
        ),
        "spec.parameters.0.max: min must be below max",
    ),
    (
        "log-from-zero",
        sweep_manifest(
            [{"field": "dpo.beta", "min": 0.0, "max": 1.0, "scale": "log"}],
            {"kind": "random", "trials": 2},
        ),
        "spec.parameters.0.scale: a log scale needs min > 0",
    ),
    (
        "grid-of-a-range",
        sweep_manifest([{"field": "dpo.beta", "min": 0.01, "max": 1.0}]),
        "spec.parameters: grid search needs values on every parameter",
    ),
    (
        "random-without-count",
        sweep_manifest(BETA, {"kind": "random"}),
        "spec.search.trials: random search needs trials",
    ),
    (
        "grid-with-a-count",
        sweep_manifest(BETA, {"kind": "grid", "trials": 4}),
        "spec.search.trials: grid search runs every combination",
    ),
    (
        "field-twice",
        sweep_manifest([*BETA, {"field": "dpo.beta", "values": [0.2]}]),
        "spec.parameters: each field may be varied by one parameter only",
    ),
    (
        "name-too-long-for-its-trials",
        sweep_manifest(BETA, name="s" * 46),
        "metadata.name: must be at most 45 characters",
    ),
    (
        "not-sweepable",
        sweep_manifest([{"field": "model.name", "values": ["a/b"]}]),
        "spec.parameters.0.field: Input should be 'dpo.beta'",
    ),
    (
        "unknown-loss",
        sweep_manifest([{"field": "dpo.lossType", "lossTypes": ["dpo"]}]),
        "spec.parameters.0.lossTypes.0: Input should be 'sigmoid'",
    ),
    (
        "losses-as-values",
        sweep_manifest([{"field": "dpo.lossType", "values": [0.1]}]),
        "spec.parameters.0.field: dpo.lossType takes lossTypes (loss names)",
    ),
    (
        "half-a-range",
        sweep_manifest([{"field": "dpo.beta", "min": 0.1}], {"kind": "random", "trials": 2}),
        "spec.parameters.0.max: a range needs both min and max",
    ),
    (
        "fractional-rank",
        sweep_manifest([{"field": "peft.r", "values": [8, 12.5]}]),
        "spec.parameters.0.values: peft.r takes integers, got 12.5",
    ),
    (
        "grid-too-large",
        sweep_manifest(
            [
                {"field": "dpo.beta", "values": [round(0.01 * i, 2) for i in range(1, 11)]},
                {"field": "dpo.learningRate", "values": [1e-5 * i for i in range(1, 8)]},
            ]
        ),
        "spec.parameters: the grid has 70 combinations (10 x 7), more than 64",
    ),
]
# Cases of SWEEP_BROKEN that the models check with their types or by expanding the trials, not
# with a CEL rule: the API server's schema says it in its own words, or nothing.
SWEEP_BEYOND_CEL = {"not-sweepable", "unknown-loss", "fractional-rank", "grid-too-large"}
