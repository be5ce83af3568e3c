"""Renders a DPOJob into the Kubernetes objects that run it. Pure: no API calls.

Children: a ConfigMap (trainer.json + accelerate.yaml), a headless Service for the rendezvous, an
Indexed Job of `nodes` training pods per attempt, and the eval-gate and promote Jobs. What a pod
receives is the pod contract of `dpo_trainer.config`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import yaml
from dpo_trainer.config import (
    ACCELERATE_CONFIG_FILE,
    ACCELERATE_CONFIG_PATH,
    CONFIG_DIR,
    DEFAULT_MASTER_PORT,
    ENV_JOB,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_METRICS_PORT,
    ENV_NAMESPACE,
    ENV_NNODES,
    ENV_NODE_RANK,
    ENV_NPROC_PER_NODE,
    EXIT_BAD_INPUT,
    EXIT_CHAMPION_CHANGED,
    EXIT_GATE_REJECTED,
    EXIT_WRONG_ENVIRONMENT,
    REFERENCE_CACHE_DIR,
    TRAINER_CONFIG_FILE,
    TRAINER_CONFIG_PATH,
    DataConfig,
    DataSource,
    DistributedConfig,
    GateConfig,
    HealthConfig,
    HoldOut,
    JobIdentity,
    LoraSettings,
    ModelRef,
    PromotionConfig,
    TrainerConfig,
    TrainingConfig,
)

from dpo_operator.api import API_VERSION, KIND, SPEC_DIGEST_ANNOTATION, DPOJob, spec_digest
from dpo_operator.network import (
    DEFAULT_ALLOWED_PROFILES,
    DEFAULT_TCPXO_DAEMON_IMAGE,
    NetworkPieces,
    network_pieces,
)
from dpo_operator.parallelism import (
    accelerate_config,
    fsdp_version,
    layout,
    mixed_precision,
    on_cpu,
    processes_per_node,
)
from dpo_operator.plan import GIB, plan
from dpo_operator.serving import served_model_name

Manifest = dict[str, Any]

LABEL_JOB = "dpo.dev/job-name"
LABEL_ATTEMPT = "dpo.dev/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_TOPOLOGY_ANNOTATIONS = {
    "Preferred": "kueue.x-k8s.io/podset-preferred-topology",
    "Required": "kueue.x-k8s.io/podset-required-topology",
}
KUEUE_SLICE_TOPOLOGY_ANNOTATION = "kueue.x-k8s.io/podset-slice-required-topology"
KUEUE_SLICE_SIZE_ANNOTATION = "kueue.x-k8s.io/podset-slice-size"
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

PVC_MOUNT_ROOT = "/mnt/pvc"
RUN_AS_USER = 1000
TRAINER_CONTAINER = "trainer"


def _release() -> str:
    try:
        return version("dpo-operator")
    except PackageNotFoundError:
        return "0.0.0-dev"


DEFAULT_TRAINER_IMAGE = f"ghcr.io/dpo-operator/trainer:{_release()}"


@dataclass(frozen=True)
class Settings:
    """What rendering takes besides the DPOJob: the operator installation's settings (the chart
    sets them; `dpo operator` and `dpo render` take the same flags, so both render the same
    objects) and where the pods run.

    The privileged pieces are the admin's: the TCPXO daemon image, the network profiles each
    namespace may use (`"*"`: every namespace) and where each namespace may promote to
    (`dpo_operator.policy` checks both).
    """

    trainer_image: str = DEFAULT_TRAINER_IMAGE  # for DPOJobs that set no spec.image
    tcpxo_daemon_image: str = DEFAULT_TCPXO_DAEMON_IMAGE
    allowed_profiles: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: {"*": frozenset(DEFAULT_ALLOWED_PROFILES)}
    )
    # URI prefixes promotion targets must lie under, per namespace ("*": every namespace;
    # "{namespace}" in a prefix is the DPOJob's). None configured: no boundary.
    promotion_roots: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The NetworkPolicy of each namespace with DPOJobs: who besides the trainers themselves may
    # reach their metrics port (the operator's namespace, and those of the Prometheus that
    # scrape them). network_policy False: none is created.
    network_policy: bool = True
    operator_namespace: str = "dpo-system"
    metrics_scrapers: tuple[str, ...] = ()
    cpu: bool = False  # the job's process layout on CPUs (`dpo run --cpu`, tests)


DEFAULT_SETTINGS = Settings()


# ----------------------------------------------------------------------------------------------
# names


def config_map_name(job: DPOJob) -> str:
    return f"{job.name}-config"


def service_name(job: DPOJob) -> str:
    return f"{job.name}-nodes"


def training_job_name(job: DPOJob, attempt: int) -> str:
    return f"{job.name}-train-{attempt}"


def eval_job_name(job: DPOJob, attempt: int) -> str:
    return f"{job.name}-eval-{attempt}"


def promote_job_name(job: DPOJob, attempt: int) -> str:
    return f"{job.name}-promote-{attempt}"


def master_address(job: DPOJob, attempt: int) -> str:
    """Rank 0's stable DNS name: Indexed Job pods get `<job>-<index>` under the subdomain."""
    return f"{training_job_name(job, attempt)}-0.{service_name(job)}"


def run_id(job: DPOJob) -> str:
    """The DPOJob's uid; a stable stand-in when rendering a manifest that was never applied."""
    return job.metadata.uid or str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"dpo.dev/{job.namespace}/{job.name}")
    )


# ----------------------------------------------------------------------------------------------
# storage: pvc:// URIs become mounted paths; object-store URIs are passed through


def pvc_claim(uri: str) -> str | None:
    if not uri.startswith("pvc://"):
        return None
    return uri.removeprefix("pvc://").split("/", 1)[0]


ClaimPaths = Mapping[str, str]


def pod_path(uri: str, claim_paths: ClaimPaths | None = None) -> str:
    """Where a storage URI is reachable inside a pod (or, with `claim_paths`, on this machine)."""
    claim = pvc_claim(uri)
    if claim is None:
        return uri
    rest = uri.removeprefix(f"pvc://{claim}").strip("/")
    root = (claim_paths or {}).get(claim, f"{PVC_MOUNT_ROOT}/{claim}")
    return root + (f"/{rest}" if rest else "")


def _in_pod(source: DataSource, claim_paths: ClaimPaths | None) -> DataSource:
    if source.uri is None:
        return source
    return source.model_copy(update={"uri": pod_path(source.uri, claim_paths)})


def _optional_in_pod(
    source: DataSource | None, claim_paths: ClaimPaths | None
) -> DataSource | None:
    return None if source is None else _in_pod(source, claim_paths)


def _model_in_pod(ref: ModelRef, claim_paths: ClaimPaths | None) -> ModelRef:
    return ref.model_copy(update={"name": pod_path(ref.name, claim_paths)})


def claims(job: DPOJob) -> list[str]:
    """The PersistentVolumeClaims the job's pvc:// URIs name."""
    spec = job.spec
    uris = [spec.model.name, spec.output.uri]
    if spec.model.reference:
        uris.append(spec.model.reference.name)
    if spec.promotion:
        uris.append(spec.promotion.target)
    for source in (
        spec.data.train,
        spec.data.eval,
        spec.eval_gate.data,
        spec.eval_gate.anchor_data,
    ):
        if source is not None and source.uri is not None:
            uris.append(source.uri)
    return sorted({claim for uri in uris if (claim := pvc_claim(uri))})


def artifacts_dir(job: DPOJob, claim_paths: ClaimPaths | None = None) -> str:
    """<output>/<namespace>/<name>/<uid>, as the pods see it."""
    output = pod_path(job.spec.output.uri, claim_paths).rstrip("/")
    return f"{output}/{job.namespace}/{job.name}/{run_id(job)}"


def reference_cache_dir(job: DPOJob, claim_paths: ClaimPaths | None = None) -> str:
    """<output>/<namespace>/reference-logps: shared by the namespace's runs on that output."""
    output = pod_path(job.spec.output.uri, claim_paths).rstrip("/")
    return f"{output}/{job.namespace}/{REFERENCE_CACHE_DIR}"


# ----------------------------------------------------------------------------------------------
# the trainer config (trainer.json)


def trainer_config(
    job: DPOJob, claim_paths: ClaimPaths | None = None, *, settings: Settings = DEFAULT_SETTINGS
) -> TrainerConfig:
    """trainer.json: every setting resolved. `claim_paths` maps PVCs to local directories
    (`dpo run`); by default they are where the pods mount them."""
    spec = job.spec
    gate = spec.eval_gate
    # A gate but no held-out pairs given: a part of the training pairs is held out for it.
    hold_out = (
        HoldOut(fraction=spec.data.hold_out.fraction, max_pairs=spec.data.hold_out.max_pairs)
        if gate.enabled and spec.data.eval is None and gate.data is None
        else None
    )
    gate_data = _in_pod(gate.data or spec.data.eval or spec.data.train, claim_paths)
    chosen = layout(spec)
    return TrainerConfig(
        job=JobIdentity(name=job.name, namespace=job.namespace, uid=run_id(job)),
        model=_model_in_pod(
            ModelRef(name=spec.model.name, revision=spec.model.revision), claim_paths
        ),
        reference=_model_in_pod(spec.model.reference, claim_paths)
        if spec.model.reference
        else None,
        trust_remote_code=spec.model.trust_remote_code,
        data=DataConfig(
            train=_in_pod(spec.data.train, claim_paths),
            eval=_optional_in_pod(spec.data.eval, claim_paths),
            format=spec.data.format,
            columns=spec.data.columns,
            hold_out=hold_out,
        ),
        training=TrainingConfig(
            loss_type=spec.dpo.loss_type,
            loss_weights=spec.dpo.loss_weights,
            beta=spec.dpo.beta,
            simpo_gamma=spec.dpo.simpo_gamma,
            learning_rate=spec.learning_rate,
            num_train_epochs=spec.dpo.epochs,
            max_steps=spec.dpo.max_steps,
            per_device_train_batch_size=spec.dpo.per_device_batch_size,
            gradient_accumulation_steps=spec.dpo.gradient_accumulation_steps,
            max_length=spec.dpo.max_length,
            precompute_ref_log_probs=spec.dpo.precompute_ref_log_probs,
            seed=spec.dpo.seed,
            logging_steps=spec.dpo.logging_steps,
            save_steps=spec.dpo.save_steps,
            gradient_checkpointing=spec.parallelism.activation_checkpointing,
            mixed_precision=mixed_precision(spec, cpu=settings.cpu),
            ddp_timeout_seconds=spec.network.collective_timeout_seconds,
            extra=spec.dpo.extra,
        ),
        lora=LoraSettings.model_validate(spec.peft.model_dump(exclude={"enabled"}))
        if spec.peft.enabled
        else None,
        distributed=DistributedConfig(
            nnodes=spec.resources.nodes,
            nproc_per_node=processes_per_node(spec),
            strategy=chosen.strategy,
            fsdp_version=fsdp_version(spec),
            shard_group_size=chosen.shard if chosen.strategy == "hsdp" else None,
            device="cpu" if on_cpu(spec, settings.cpu) else "cuda",
        ),
        artifacts_dir=artifacts_dir(job, claim_paths),
        gate=GateConfig(
            gpus=eval_gpus(job, settings=settings),
            data=gate_data,
            hold_out=hold_out,
            anchor_data=_optional_in_pod(gate.anchor_data, claim_paths),
            max_samples=gate.max_samples,
            min_reward_accuracy=gate.min_reward_accuracy,
            min_reward_margin=gate.min_reward_margin,
            max_anchor_nll_increase=gate.max_anchor_nll_increase,
            must_beat_promoted=gate.must_beat_promoted,
            beat_margin=gate.beat_margin,
            confidence=gate.confidence,
        )
        if gate.enabled
        else None,
        promotion=PromotionConfig(
            target=pod_path(spec.promotion.target, claim_paths),
            mode=spec.promotion.mode,
            served_model_name=served_model_name(job),
            plain_http=spec.promotion.plain_http,
        )
        if spec.promotion
        else None,
        reference_cache=reference_cache_dir(job, claim_paths)
        if spec.dpo.precompute_ref_log_probs
        else None,
        health=HealthConfig(action=spec.health.action, warmup_steps=spec.health.warmup_steps),
        metrics_port=spec.monitoring.port,
    )


# ----------------------------------------------------------------------------------------------
# objects


def render_all(
    job: DPOJob, attempt: int = 1, *, settings: Settings = DEFAULT_SETTINGS
) -> list[Manifest]:
    """Every child of `job` for training attempt `attempt` (what `dpo render` prints)."""
    children = [render_config_map(job, settings=settings), render_service(job)]
    if settings.network_policy and not settings.cpu:
        children.append(render_network_policy(job, settings=settings))
    children.append(render_training_job(job, attempt, settings=settings))
    if job.spec.eval_gate.enabled:
        children.append(render_eval_job(job, attempt, settings=settings))
    if job.spec.promotion is not None:
        children.append(render_promote_job(job, attempt, settings=settings))
    return children


def render_child(
    job: DPOJob, kind: str, attempt: int, *, settings: Settings = DEFAULT_SETTINGS
) -> Manifest:
    """The child a lifecycle `Create(kind, attempt)` asks for: config, service, train, eval or
    promote."""
    renderers: dict[str, Callable[[], Manifest]] = {
        "config": lambda: render_config_map(job, settings=settings),
        "network-policy": lambda: render_network_policy(job, settings=settings),
        "service": lambda: render_service(job),
        "train": lambda: render_training_job(job, attempt, settings=settings),
        "eval": lambda: render_eval_job(job, attempt, settings=settings),
        "promote": lambda: render_promote_job(job, attempt, settings=settings),
    }
    return renderers[kind]()


def labels(job: DPOJob, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dpojob",
        "app.kubernetes.io/instance": job.name,
        LABEL_COMPONENT: component,
        "app.kubernetes.io/part-of": "dpo-operator",
        "app.kubernetes.io/managed-by": "dpo-operator",
        LABEL_JOB: job.name,
    }


def _metadata(job: DPOJob, name: str, component: str, **extra_labels: str) -> Manifest:
    metadata: Manifest = {
        "name": name,
        "namespace": job.namespace,
        "labels": {**labels(job, component), **extra_labels},
        "annotations": {SPEC_DIGEST_ANNOTATION: spec_digest(job.spec)},
    }
    if job.metadata.uid:
        metadata["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": job.name,
                "uid": job.metadata.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return metadata


NETWORK_POLICY_NAME = "dpo-trainers"


def render_network_policy(job: DPOJob, *, settings: Settings = DEFAULT_SETTINGS) -> Manifest:
    """Fences the pods of every DPOJob in the namespace: only they reach one another
    (rendezvous, NCCL, any port), and only the operator and the admin's metrics scrapers reach
    the named `metrics` port. One per namespace, shared by its DPOJobs (so it has no owner)."""
    namespaces = (settings.operator_namespace, *settings.metrics_scrapers)
    scrapers = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}
        for name in dict.fromkeys(namespaces)
    ]
    trainers = {"matchLabels": {"app.kubernetes.io/managed-by": "dpo-operator"}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NETWORK_POLICY_NAME,
            "namespace": job.namespace,
            "labels": {
                "app.kubernetes.io/part-of": "dpo-operator",
                "app.kubernetes.io/managed-by": "dpo-operator",
            },
        },
        "spec": {
            "podSelector": trainers,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": trainers}]},
                {"from": scrapers, "ports": [{"protocol": "TCP", "port": "metrics"}]},
            ],
        },
    }


def render_config_map(job: DPOJob, *, settings: Settings = DEFAULT_SETTINGS) -> Manifest:
    trainer_json = trainer_config(job, settings=settings).model_dump_json(by_alias=True, indent=2)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job), "config"),
        "data": {
            TRAINER_CONFIG_FILE: trainer_json + "\n",
            ACCELERATE_CONFIG_FILE: yaml.safe_dump(
                accelerate_config(job.spec, cpu=settings.cpu), sort_keys=False
            ),
        },
    }


def render_service(job: DPOJob) -> Manifest:
    """Headless Service giving each training pod a DNS name, published before it is Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must resolve while every rank is still starting up, long before Ready.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.name, LABEL_COMPONENT: "train"},
            "ports": [
                {"name": "rendezvous", "port": DEFAULT_MASTER_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": job.spec.monitoring.port, "protocol": "TCP"},
            ],
        },
    }


def launch_command(job: DPOJob) -> list[str]:
    """`accelerate launch` with machine count, rank, address and port passed explicitly.

    accelerate ignores torchrun's PET_* variables; without these flags every node would train
    alone with world size 1 and report success. `dpo-trainer launch --` runs it as PID 1 and
    forwards SIGTERM, so the trainer checkpoints before the pod goes away.
    """
    spec = job.spec
    return [
        "dpo-trainer",
        "launch",
        "--",
        "accelerate",
        "launch",
        "--config_file",
        ACCELERATE_CONFIG_PATH,
        "--num_machines",
        f"$({ENV_NNODES})",
        "--num_processes",
        str(spec.resources.nodes * processes_per_node(spec)),
        "--machine_rank",
        f"$({ENV_NODE_RANK})",
        "--main_process_ip",
        f"$({ENV_MASTER_ADDR})",
        "--main_process_port",
        f"$({ENV_MASTER_PORT})",
        "--module",
        "dpo_trainer.cli",
        "train",
        "--config",
        TRAINER_CONFIG_PATH,
    ]


def contract_env(job: DPOJob, attempt: int) -> list[Manifest]:
    """The pod contract's variables, in dependency order (later ones may use $(EARLIER))."""
    spec = job.spec
    env: list[Manifest] = [
        {"name": ENV_JOB, "value": job.name},
        {"name": ENV_NAMESPACE, "value": job.namespace},
        {"name": ENV_NNODES, "value": str(spec.resources.nodes)},
        {"name": ENV_NPROC_PER_NODE, "value": str(processes_per_node(spec))},
        {"name": ENV_NODE_RANK, "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}},
        {"name": ENV_MASTER_ADDR, "value": master_address(job, attempt)},
        {"name": ENV_MASTER_PORT, "value": str(DEFAULT_MASTER_PORT)},
        {"name": ENV_METRICS_PORT, "value": str(spec.monitoring.port)},
    ]
    if spec.resources.gpus_per_node == 0:
        # On CPU accelerate starts one process per pod itself and, unlike torchrun, does not set
        # the ranks: torch.distributed reads them from here.
        env += [
            {"name": "RANK", "value": f"$({ENV_NODE_RANK})"},
            {"name": "WORLD_SIZE", "value": f"$({ENV_NNODES})"},
            {"name": "LOCAL_RANK", "value": "0"},
        ]
    return env


def _user_env(job: DPOJob) -> list[Manifest]:
    spec = job.spec
    env: list[Manifest] = [{"name": e.name, "value": e.value} for e in spec.env]
    env += [
        {
            "name": s.name,
            "valueFrom": {
                "secretKeyRef": {"name": s.secret_key_ref.name, "key": s.secret_key_ref.key}
            },
        }
        for s in spec.secrets
    ]
    return env


def _resources(
    gpus: int,
    gpu_resource: str,
    cpu: str | int | None,
    memory: str | int | None,
    extra: dict[str, str],
) -> Manifest:
    requests: dict[str, str] = {}
    limits: dict[str, str] = dict(extra)
    if gpus:
        limits[gpu_resource] = str(gpus)
    if cpu is not None:
        requests["cpu"] = str(cpu)
    if memory is not None:
        requests["memory"] = limits["memory"] = str(memory)
    resources: Manifest = {}
    if requests:
        resources["requests"] = requests
    if limits:
        # Extended resources (GPUs, RDMA devices) are requested through their limit.
        resources["limits"] = limits
    return resources


def _volumes(job: DPOJob, pieces: NetworkPieces | None) -> tuple[list[Manifest], list[Manifest]]:
    volumes: list[Manifest] = [
        {"name": "dpo-config", "configMap": {"name": config_map_name(job)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Manifest] = [
        {"name": "dpo-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for claim in claims(job):
        volumes.append({"name": f"pvc-{claim}"[:63], "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{claim}"[:63], "mountPath": f"{PVC_MOUNT_ROOT}/{claim}"})
    if pieces is not None:
        volumes.append(
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": str(job.spec.resources.shm_size)},
            }
        )
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes += pieces.volumes
        mounts += pieces.trainer_mounts
    return volumes, mounts


def _container_security(capabilities: tuple[str, ...]) -> Manifest:
    caps: Manifest = {"drop": ["ALL"]}
    if capabilities:
        caps["add"] = list(capabilities)
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "capabilities": caps,
    }


def _pod_spec(
    job: DPOJob, container: Manifest, volumes: list[Manifest], *, restart_policy: str = "Never"
) -> Manifest:
    scheduling = job.spec.scheduling
    pod: Manifest = {
        "restartPolicy": restart_policy,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    if scheduling.node_selector:
        pod["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in scheduling.tolerations
        ]
    if scheduling.affinity:
        pod["affinity"] = json.loads(json.dumps(scheduling.affinity))
    return pod


def _job(
    job: DPOJob,
    name: str,
    component: str,
    attempt: int,
    pod: Manifest,
    *,
    pod_annotations: dict[str, str] | None = None,
    suspend: bool,
    spec_extra: Manifest,
) -> Manifest:
    attempt_label = {LABEL_ATTEMPT: str(attempt)}
    metadata = _metadata(job, name, component, **attempt_label)
    queue = job.spec.scheduling.queue_name
    if queue and component != "promote":
        metadata["labels"][KUEUE_QUEUE_LABEL] = queue
    template_metadata: Manifest = {"labels": {**labels(job, component), **attempt_label}}
    if pod_annotations:
        template_metadata["annotations"] = pod_annotations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            **spec_extra,
            # Kueue admits a queued Job by unsuspending it.
            "suspend": suspend or bool(queue and component != "promote"),
            "template": {"metadata": template_metadata, "spec": pod},
        },
    }


def render_training_job(
    job: DPOJob, attempt: int, *, settings: Settings = DEFAULT_SETTINGS
) -> Manifest:
    """An Indexed Job of `nodes` pods; pod i is machine rank i (its completion index)."""
    spec = job.spec
    gpus = 0 if settings.cpu else spec.resources.gpus_per_node
    # CPUs have no GPU NICs: plain TCP, whatever fabric the job's GPUs would use.
    network = spec.network.model_copy(update={"profile": "tcp"}) if settings.cpu else spec.network
    pieces = network_pieces(network, gpus, settings.tcpxo_daemon_image)
    volumes, mounts = _volumes(job, pieces)
    container: Manifest = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": launch_command(job),
        "env": contract_env(job, attempt)
        + [{"name": k, "value": v} for k, v in pieces.env.items()]
        + _user_env(job),
        "ports": [
            {"name": "rendezvous", "containerPort": DEFAULT_MASTER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": spec.monitoring.port, "protocol": "TCP"},
        ],
        "resources": _resources(
            gpus,
            spec.resources.gpu_resource_name,
            spec.resources.cpu,
            spec.resources.memory,
            pieces.resources,
        ),
        "volumeMounts": mounts,
        "securityContext": _container_security(pieces.capabilities),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.output.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.output.credentials_secret}}]
    pod = _pod_spec(job, container, volumes)
    pod["subdomain"] = service_name(job)
    # Time for the trainer to finish the step and write a checkpoint after SIGTERM.
    pod["terminationGracePeriodSeconds"] = 300
    if pieces.sidecars:
        pod["initContainers"] = list(pieces.sidecars)
    annotations = dict(pieces.annotations)
    topology = spec.scheduling.topology_key
    if topology and spec.scheduling.queue_name:
        annotations.update(kueue_topology_annotations(job, topology))
    elif topology:
        _add_packing_affinity(pod, job, topology)
    nodes = spec.resources.nodes
    return _job(
        job,
        training_job_name(job, attempt),
        "train",
        attempt,
        pod,
        pod_annotations=annotations,
        suspend=spec.run_policy.suspend,
        spec_extra={
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            # The operator restarts the whole group from its checkpoint; the Job never retries
            # one pod alone, which would leave it waiting for peers that already gave up.
            "backoffLimit": 0,
            # A replacement pod starts only once the old one is gone, never beside it.
            "podReplacementPolicy": "Failed",
        },
    )


def kueue_topology_annotations(job: DPOJob, topology_key: str) -> dict[str, str]:
    """What Kueue's topology-aware scheduling reads off the training pods: the whole gang in one
    `topology_key` group (preferred or required), and for hsdp each shard group in one: the
    shards all-gather every layer, the replicas only all-reduce once a step."""
    annotations = {KUEUE_TOPOLOGY_ANNOTATIONS[job.spec.scheduling.topology_policy]: topology_key}
    chosen = layout(job.spec)
    if chosen.strategy == "hsdp":
        # plan.layouts makes each hsdp shard group whole nodes: shard = nodes in it x GPUs.
        pods_per_shard_group = chosen.shard // job.spec.resources.gpus_per_node
        annotations[KUEUE_SLICE_TOPOLOGY_ANNOTATION] = topology_key
        annotations[KUEUE_SLICE_SIZE_ANNOTATION] = str(pods_per_shard_group)
    return annotations


def _add_packing_affinity(pod: Manifest, job: DPOJob, topology_key: str) -> None:
    selector = {"matchLabels": {LABEL_JOB: job.name, LABEL_COMPONENT: "train"}}
    term = {"topologyKey": topology_key, "labelSelector": selector}
    affinity = pod.setdefault("affinity", {})
    pod_affinity = affinity.setdefault("podAffinity", {})
    if job.spec.scheduling.topology_policy == "Required":
        # The first pod matches its own labels, so the gang's first pod picks the group.
        pod_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(term)
    else:
        preferred = {"weight": 100, "podAffinityTerm": term}
        pod_affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
            preferred
        )


def _single_pod_job(
    job: DPOJob,
    name: str,
    component: str,
    attempt: int,
    gpus: int,
    cpu: str | int | None,
    memory: str | int | None,
    non_retryable: list[int],
    settings: Settings,
) -> Manifest:
    spec = job.spec
    volumes, mounts = _volumes(job, None)
    container: Manifest = {
        "name": component,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dpo-trainer", component, "--config", TRAINER_CONFIG_PATH],
        "env": [
            {"name": ENV_JOB, "value": job.name},
            {"name": ENV_NAMESPACE, "value": job.namespace},
            *_user_env(job),
        ],
        "resources": _resources(gpus, spec.resources.gpu_resource_name, cpu, memory, {}),
        "volumeMounts": mounts,
        "securityContext": _container_security(()),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.output.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.output.credentials_secret}}]
    return _job(
        job,
        name,
        component,
        attempt,
        _pod_spec(job, container, volumes),
        suspend=False,
        spec_extra={
            "backoffLimit": 2,
            "podFailurePolicy": {
                "rules": [
                    # Bad input, a rejected gate, a champion that changed: a retry gives the
                    # same answer.
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": component,
                            "operator": "In",
                            "values": sorted(non_retryable),  # the API wants them in order
                        },
                    },
                    # Preemption and node drains are not the pod's fault.
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
        },
    )


def eval_gpus(job: DPOJob, *, settings: Settings = DEFAULT_SETTINGS) -> int:
    """GPUs of the eval pod: evalGate.resources.gpus, else as many as the memory plan says the
    bf16 model needs (one when its size is unknown)."""
    spec = job.spec
    if settings.cpu or spec.resources.gpus_per_node == 0:
        return 0
    if spec.eval_gate.resources.gpus is not None:
        return spec.eval_gate.resources.gpus
    return plan(spec).eval_gpus or 1


def eval_memory(job: DPOJob) -> str | int | None:
    """Memory of the eval pod: evalGate.resources.memory, else what loading the bf16 model
    takes (when its size is known), else the training pods' memory."""
    spec = job.spec
    if spec.eval_gate.resources.memory is not None:
        return spec.eval_gate.resources.memory
    planned = plan(spec).eval_memory
    return f"{planned // GIB}Gi" if planned else spec.resources.memory


def render_eval_job(
    job: DPOJob, attempt: int, *, settings: Settings = DEFAULT_SETTINGS
) -> Manifest:
    """The gate: scores the adapter of training attempt `attempt` on held-out pairs."""
    spec = job.spec
    gate = spec.eval_gate.resources
    return _single_pod_job(
        job,
        eval_job_name(job, attempt),
        "eval",
        attempt,
        eval_gpus(job, settings=settings),
        gate.cpu if gate.cpu is not None else spec.resources.cpu,
        eval_memory(job),
        [EXIT_BAD_INPUT, EXIT_GATE_REJECTED, EXIT_WRONG_ENVIRONMENT],
        settings,
    )


def render_promote_job(
    job: DPOJob, attempt: int, *, settings: Settings = DEFAULT_SETTINGS
) -> Manifest:
    """Copies the gated adapter to the promotion target; needs no GPU."""
    return _single_pod_job(
        job,
        promote_job_name(job, attempt),
        "promote",
        attempt,
        0,
        "500m",
        "2Gi",
        [EXIT_BAD_INPUT, EXIT_WRONG_ENVIRONMENT, EXIT_CHAMPION_CHANGED],
        settings,
    )


class _BlockStyleDumper(yaml.SafeDumper):
    """Writes multi-line strings (trainer.json, accelerate.yaml) as readable `|` blocks."""


def _str_representer(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockStyleDumper.add_representer(str, _str_representer)


def to_yaml(objects: list[Manifest]) -> str:
    return yaml.dump_all(objects, Dumper=_BlockStyleDumper, sort_keys=False, width=100)
