"""The memory plan: sizes that must fit, the strategy `auto` picks, and jobs that fit nowhere."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from dpo_contract.pod import ACCELERATE_CONFIG_FILE
from dpo_operator.api import describe_errors
from dpo_operator.core.lifecycle import Observed, decide
from dpo_operator.core.plan import GIB, estimate, gpu_memory, model_shape, plan
from dpo_operator.core.render import (
    render_config_map,
    render_eval_job,
    render_training_job,
    trainer_config,
)
from dpo_operator.core.resolve import resolve
from dpo_operator.core.validate import parse_dpojob
from pydantic import ValidationError

from tests.conftest import example, example_manifest, job_with, minimal_manifest, set_fields

H100 = {"gpuMemory": "80Gi"}


NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def llama_job(model: str, nodes: int, lora: bool, **changes: Any) -> dict[str, Any]:
    manifest = set_fields(
        minimal_manifest(),
        **{
            "model.name": model,
            "resources": {"nodes": nodes, "gpusPerNode": 8, **H100},
            "peft.enabled": lora,
            "dpo.maxLength": 2048,
            "dpo.perDeviceBatchSize": 1,
        },
    )
    return set_fields(manifest, **changes)


def chosen(manifest: dict[str, Any]) -> tuple[str, int]:
    result = plan(parse_dpojob(manifest).spec)
    assert result.choice is not None
    return result.choice.strategy, result.choice.shard


def test_8b_lora_on_one_node_of_h100_replicates() -> None:
    job = parse_dpojob(llama_job("meta-llama/Llama-3.1-8B-Instruct", 1, lora=True))
    result = plan(job.spec)
    assert result.shape is not None
    assert result.shape.parameters == pytest.approx(8.03e9, rel=0.01)
    assert chosen(llama_job("meta-llama/Llama-3.1-8B-Instruct", 1, lora=True)) == ("ddp", 1)
    assert result.estimates[0].parts["reference"] == 0, "the base with the adapter disabled"


def test_32b_full_finetune_on_two_nodes_with_precompute_fits_sharded() -> None:
    manifest = llama_job(
        "Qwen/Qwen2.5-32B-Instruct", 2, lora=False, **{"dpo.precomputeRefLogProbs": True}
    )
    strategy, _ = chosen(manifest)
    assert strategy in ("hsdp", "fsdp")
    result = plan(parse_dpojob(manifest).spec)
    picked = next(e for e in result.estimates if e.layout == result.choice)
    assert picked.fits
    assert picked.parts["reference"] == 0, "precomputed: no reference while training"


def test_70b_full_finetune_on_four_nodes_shards_beyond_one_node() -> None:
    manifest = llama_job("s3://acme/llama-3.3-70b-sft", 4, lora=False)
    strategy, shard = chosen(manifest)
    print(f"70B full fine-tune on 4 x 8 H100: {strategy} over {shard} GPUs")
    assert shard > 8, "one node's eight GPUs cannot hold 70B x 16 bytes"


def test_70b_lora_on_two_nodes_shards_but_never_replicates_the_base() -> None:
    strategy, shard = chosen(llama_job("meta-llama/Llama-3.1-70B-Instruct", 2, lora=True))
    assert strategy != "ddp", "140 GB of bf16 base weights do not fit one GPU"
    assert shard >= 8


def test_70b_full_finetune_on_one_node_is_refused_naming_the_fixes() -> None:
    with pytest.raises(ValidationError) as refused:
        parse_dpojob(llama_job("meta-llama/Llama-3.1-70B-Instruct", 1, lora=False))
    (message,) = describe_errors(refused.value)
    print(message)
    assert message.startswith("spec.resources: this 70.6B-parameter full fine-tune fits on no")
    for fix in (
        "resources.nodes: 3",
        "peft.enabled: true",
        "dpo.precomputeRefLogProbs: true",
        "parallelism.cpuOffload: true",
    ):
        assert fix in message


def test_a_full_finetune_never_keeps_an_unsharded_second_copy_that_does_not_fit() -> None:
    manifest = llama_job("meta-llama/Llama-3.1-8B-Instruct", 1, lora=False)
    replicated = set_fields(copy.deepcopy(manifest), **{"parallelism.strategy": "ddp"})
    with pytest.raises(ValidationError) as refused:
        parse_dpojob(replicated)
    assert "fits on no strategy" in describe_errors(refused.value)[0]
    strategy, _ = chosen(manifest)
    result = plan(parse_dpojob(manifest).spec)
    sharded = next(e for e in result.estimates if e.layout == result.choice)
    assert strategy == "fsdp"
    assert sharded.parts["reference"] == 2 * result.shape.parameters // 8  # type: ignore[union-attr]


def test_a_shard_group_spans_as_many_nodes_as_it_must() -> None:
    manifest = llama_job(
        "s3://acme/custom-sft",
        4,
        lora=False,
        **{"model.parameters": "45B", "dpo.precomputeRefLogProbs": True},
    )
    job = parse_dpojob(manifest)
    assert chosen(manifest) == ("hsdp", 16)
    accelerate = yaml.safe_load(render_config_map(resolve(job))["data"][ACCELERATE_CONFIG_FILE])
    assert accelerate["parallelism_config"]["parallelism_config_dp_replicate_size"] == 2
    assert accelerate["parallelism_config"]["parallelism_config_dp_shard_size"] == 16
    distributed = trainer_config(resolve(job)).distributed
    assert distributed.shard_group_size == 16
    assert distributed.mesh_shape == (2, 16)


@pytest.mark.parametrize(
    ("resources", "scheduling", "expected_gib", "source"),
    [
        ({"gpuMemory": "141Gi"}, {}, 141, "resources.gpuMemory"),
        ({}, {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}, 40, "nvidia.com/gpu.product"),
        ({}, {"cloud.google.com/gke-accelerator": "nvidia-h100-mega-80gb"}, 80, "gke-accelerator"),
        ({}, {"node.kubernetes.io/instance-type": "p5en.48xlarge"}, 141, "instance-type"),
    ],
)
def test_gpu_memory_comes_from_the_spec_or_a_known_product_label(
    resources: dict[str, str], scheduling: dict[str, str], expected_gib: int, source: str
) -> None:
    job = job_with(
        resources={"gpusPerNode": 8, **resources}, scheduling={"nodeSelector": scheduling}
    )
    memory = gpu_memory(job.spec)
    assert memory is not None
    assert memory.bytes == expected_gib * GIB
    assert source in memory.source
    assert not memory.assumed


def test_unknown_gpus_are_assumed_and_never_refused() -> None:
    manifest = set_fields(
        llama_job("meta-llama/Llama-3.1-70B-Instruct", 1, lora=False),
        resources={"nodes": 1, "gpusPerNode": 8},
    )
    job = parse_dpojob(manifest)  # B200s might hold it: nothing is refused on a guess
    result = plan(job.spec)
    assert result.gpu is not None
    assert result.gpu.assumed
    assert "set resources.gpuMemory" in result.reason


def test_an_unknown_model_is_sized_by_spec_model_parameters() -> None:
    unknown = job_with(model={"name": "s3://acme/our-model"}, resources={"gpusPerNode": 8})
    assert model_shape(unknown.spec) is None
    assert "set spec.model.parameters" in plan(unknown.spec).reason
    sized = job_with(
        model={"name": "s3://acme/our-model", "parameters": "13B"}, resources={"gpusPerNode": 8}
    )
    shape = model_shape(sized.spec)
    assert shape is not None
    assert shape.parameters == 13_000_000_000
    assert "spec.model.parameters (13B)" in shape.source


def test_a_bad_parameter_count_says_how_to_write_one() -> None:
    manifest = set_fields(minimal_manifest(), **{"model.parameters": "seventy"})
    with pytest.raises(ValidationError) as refused:
        parse_dpojob(manifest)
    assert describe_errors(refused.value) == [
        "spec.model.parameters: 'seventy' is not a parameter count; write e.g. 70B, 8.03B, 500M "
        "or 7615616512"
    ]


def test_the_gate_gets_the_gpus_its_bf16_weights_need_and_uses_them_all() -> None:
    job = parse_dpojob(llama_job("s3://acme/llama-3.3-70b-sft", 4, lora=False))
    container = render_eval_job(resolve(job), 1)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "3", "140 GB of bf16 weights"
    assert container["resources"]["limits"]["memory"] == "173Gi"
    gate = trainer_config(resolve(job)).gate
    assert gate is not None
    assert gate.gpus == 3, "the scorer spreads the model over all of them"
    override = set_fields(
        llama_job("s3://acme/llama-3.3-70b-sft", 4, lora=False),
        **{"evalGate.resources": {"gpus": 4, "memory": "300Gi"}},
    )
    limits = render_eval_job(resolve(parse_dpojob(override)), 1)["spec"]["template"]["spec"][
        "containers"
    ][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "4", "memory": "300Gi"}


def test_a_model_no_node_can_hold_for_the_gate_is_refused() -> None:
    manifest = llama_job(
        "meta-llama/Llama-3.1-405B", 8, lora=True, **{"resources.gpuMemory": "40Gi"}
    )
    with pytest.raises(ValidationError) as refused:
        parse_dpojob(manifest)
    problems = describe_errors(refused.value)
    assert any(p.startswith("spec.evalGate: holding the 405") for p in problems), problems


def test_the_70b_example_loads_within_what_its_pods_ask_for() -> None:
    """Each process reads only its slice of each tensor: a pod of eight holds tens of GiB at
    load, not a copy of the model per process (1 TiB)."""
    result = plan(example("full-finetune-hsdp-efa").spec)
    assert result.choice is not None
    assert result.choice.strategy in ("fsdp", "hsdp")
    assert result.host_memory is not None
    print(f"70B example: {result.host_memory / GIB:.0f} GiB of host memory per pod at load")
    assert result.host_memory < 64 * GIB
    assert not result.problems


def test_a_pod_that_cannot_load_its_copies_within_resources_memory_is_refused() -> None:
    manifest = llama_job(
        "meta-llama/Llama-3.1-8B-Instruct", 1, lora=True, **{"resources.memory": "64Gi"}
    )
    with pytest.raises(ValidationError) as refused:
        parse_dpojob(manifest)
    (message,) = describe_errors(refused.value)
    print(message)
    assert message.startswith(
        "spec.resources.memory: each pod's processes put 120 GiB of the model in host memory"
    )
    assert "(about 152 GiB with their own), more than the 64Gi asked" in message
    assert "parallelism.strategy fsdp or hsdp" in message
    sharded = set_fields(copy.deepcopy(manifest), **{"parallelism.strategy": "fsdp"})
    assert plan(parse_dpojob(sharded).spec).host_memory < 64 * GIB  # type: ignore[operator]


def test_a_sharded_full_finetune_counts_the_gathered_layers_and_fp32_reduce_buffers() -> None:
    spec = parse_dpojob(llama_job("meta-llama/Llama-3.1-8B-Instruct", 1, lora=False)).spec
    result = plan(spec)
    shape = result.shape
    assert shape is not None
    sharded = next(e for e in result.estimates if e.layout == result.choice)
    per_layer = shape.parameters // shape.layers
    # In the backward pass: the layer computing, the next one's all-gather buffer and the
    # parameters it is copied into, in bf16; one layer's gradients reduced in fp32.
    assert sharded.parts["gathered layers"] == pytest.approx(2 * 3 * per_layer, rel=0.01)
    on_cpu = estimate(spec, shape, sharded.layout, 0, device="cpu")
    # Gloo stages each all-gather once more, and CPUs load fp32.
    assert on_cpu.parts["gathered layers"] == pytest.approx(4 * 4 * per_layer, rel=0.01)
    assert sharded.parts["reduce buffers"] == pytest.approx(4 * per_layer, rel=0.01)


def training_pod(manifest: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = render_training_job(resolve(parse_dpojob(manifest)), 1)["spec"][
        "template"
    ]["spec"]
    return pod


def disk_of(pod: dict[str, Any]) -> tuple[str, str]:
    """What the trainer asks for of local disk, and the size limit of its /tmp."""
    asked = pod["containers"][0]["resources"]["requests"]["ephemeral-storage"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    return asked, tmp["emptyDir"]["sizeLimit"]


def test_each_pod_asks_for_the_disk_its_downloads_and_staged_checkpoints_take() -> None:
    """An 8B full fine-tune on 2 nodes with an object store: 16 GB of download, two staged
    shares of a 96 GB checkpoint (48 GB a pod), 8 GB of export (120 GB, 112 GiB) and 2 GiB of
    slack. On a mounted volume nothing is staged; `resources.ephemeralStorage` wins."""
    fsdp = {"parallelism.strategy": "fsdp"}
    on_s3 = llama_job("meta-llama/Llama-3.1-8B-Instruct", 2, lora=False, **fsdp)
    on_s3 = set_fields(on_s3, **{"output.uri": "s3://bucket/runs"})
    asked, limit = disk_of(training_pod(on_s3))
    print(f"8B full fine-tune on 2 pods, s3: {asked}")
    assert asked == limit == "115Gi"
    on_pvc = set_fields(copy.deepcopy(on_s3), **{"output.uri": "pvc://runs/dpo"})
    assert disk_of(training_pod(on_pvc)) == ("17Gi", "17Gi"), "the download and slack only"
    asked_for = set_fields(copy.deepcopy(on_s3), **{"resources.ephemeralStorage": "400Gi"})
    assert disk_of(training_pod(asked_for)) == ("400Gi", "400Gi")


def test_the_grace_period_is_the_time_a_save_on_sigterm_takes() -> None:
    """8B full fine-tune on 2 nodes with an object store: each pod writes a 48 GB share at 200
    MiB/s (230 s) and sends it at 100 MiB/s (460 s), after up to 60 s to finish its step."""
    manifest = set_fields(
        llama_job(
            "meta-llama/Llama-3.1-8B-Instruct", 2, lora=False, **{"parallelism.strategy": "fsdp"}
        ),
        **{"output.uri": "s3://bucket/runs"},
    )
    resolved = resolve(parse_dpojob(manifest))
    assert training_pod(manifest)["terminationGracePeriodSeconds"] == 750
    assert trainer_config(resolved).training.save_on_signal
    on_pvc = set_fields(copy.deepcopy(manifest), **{"output.uri": "pvc://runs/dpo"})
    assert training_pod(on_pvc)["terminationGracePeriodSeconds"] == 290, "nothing to send"


def test_a_grace_period_too_short_for_a_save_stops_without_one_and_says_so() -> None:
    """A spot notice of 120 s: the trainer is told not to save on SIGTERM, and the first
    attempt's creation comes with a Warning that names both figures."""
    manifest = set_fields(
        llama_job(
            "meta-llama/Llama-3.1-8B-Instruct", 2, lora=False, **{"parallelism.strategy": "fsdp"}
        ),
        **{
            "output.uri": "s3://bucket/runs",
            "runPolicy.terminationGracePeriodSeconds": 120,
            "model.initialize": False,
        },
    )
    job = parse_dpojob(manifest)
    assert training_pod(manifest)["terminationGracePeriodSeconds"] == 120
    assert not trainer_config(resolve(job)).training.save_on_signal
    (event,) = [
        e for e in decide(job, Observed(now=NOW)).events if e.reason == "NoSaveOnPreemption"
    ]
    print(event.message)
    assert event.type == "Warning"
    assert "needs about 750 s" in event.message
    assert "(120 s)" in event.message


def test_a_job_queued_in_kueue_asks_for_disk_only_when_told_to() -> None:
    """Kueue admits nothing that requests a resource its ClusterQueue does not cover, and most
    cover no disk: a queued job requests ephemeral-storage only with resources.ephemeralStorage
    (then its ClusterQueue must cover it); /tmp keeps the plan's limit either way."""
    queued = llama_job(
        "meta-llama/Llama-3.1-8B-Instruct", 1, lora=True, **{"scheduling.queueName": "gpus"}
    )
    pod = training_pod(queued)
    assert "ephemeral-storage" not in pod["containers"][0]["resources"].get("requests", {})
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"]["sizeLimit"].endswith("Gi")
    told = set_fields(copy.deepcopy(queued), **{"resources.ephemeralStorage": "200Gi"})
    assert disk_of(training_pod(told)) == ("200Gi", "200Gi")


def test_gpu_pods_ask_for_the_host_memory_the_plan_says_they_hold() -> None:
    """Without resources.memory, a GPU training pod requests (and is limited to) what the plan
    says it holds while loading, so the scheduler and Kueue place what will really run; with
    it, the spec's; CPU pods take what they get unless told."""
    manifest = example_manifest("qwen3-8b-lora")
    del manifest["spec"]["resources"]["memory"]
    job = parse_dpojob(manifest)
    resolved = resolve(job)
    planned = resolved.plan.host_memory
    assert planned is not None
    container = render_training_job(resolved, 1)["spec"]["template"]["spec"]["containers"][0]
    expected = f"{-(-planned // GIB)}Gi"
    assert container["resources"]["requests"]["memory"] == expected
    assert container["resources"]["limits"]["memory"] == expected
    given = render_training_job(resolve(example("qwen3-8b-lora")), 1)
    assert (
        given["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        == "512Gi"
    )
    on_cpu = job_with(resources={"gpusPerNode": 0})
    cpu = render_training_job(resolve(on_cpu), 1)["spec"]["template"]["spec"]["containers"][0]
    assert "memory" not in cpu["resources"].get("requests", {})
