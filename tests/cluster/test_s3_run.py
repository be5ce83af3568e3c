"""A whole DPOJob on a real S3 server (SeaweedFS), in pods that really run: the model initializer
pod counts the model in the store before any training pod exists, checkpoints go to the store, a
training pod killed mid-step resumes from the store's checkpoint in a fresh pod (its own empty
/tmp), the gate and the promotion fetch the adapter from the store, and what was promoted reads
back with every digest as recorded. The credentials and the endpoint come only from the Secret
the spec names; the store refuses anyone without them."""

from __future__ import annotations

import json

import pytest
from dpo_contract.manifest import verify_manifest
from dpo_trainer.io.artifacts import CHECKPOINTS, EVAL_REPORT, TRAIN_REPORT, download_folder
from dpo_trainer.io.builtin import builtin_model_path
from dpo_trainer.io.checkpoints import COMPLETE_MARKER
from dpo_trainer.io.models import cache_dir
from dpo_trainer.publish.pointer import CURRENT, VERSIONS
from transformers import AutoModelForCausalLM

from tests.cluster.control_plane import ControlPlane, Operator, wait_for
from tests.cluster.pod_plane import TRAINING_TIMEOUT, Run
from tests.cluster.pod_runner import GATEWAY, PodRunner
from tests.object_store import ObjectStore

NAMESPACE = "s3-run"
SECRET = "s3-credentials"


def test_a_run_on_s3_resumes_from_the_store_then_gates_and_promotes_through_it(
    pod_plane: ControlPlane,
    pod_runner: PodRunner,
    pod_operator: Operator,
    object_store: ObjectStore,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    bucket = object_store.bucket()
    pod_plane.kubectl("create", "namespace", NAMESPACE, check=False)
    pod_plane.kubectl(
        "create",
        "secret",
        "generic",
        SECRET,
        "-n",
        NAMESPACE,
        *(f"--from-literal={k}={v}" for k, v in object_store.env(host=str(GATEWAY)).items()),
    )
    target = f"s3://{bucket}/promoted/quickstart"
    store = object_store.fs()
    tiny = builtin_model_path("builtin:tiny-llama", cache_dir() / "models")
    for file in sorted(tiny.iterdir()):
        if not file.name.startswith("."):
            store.put_file(str(file), f"{bucket}/models/tiny-llama/{file.name}")
    model = f"s3://{bucket}/models/tiny-llama"
    run = Run(
        pod_plane,
        pod_runner,
        NAMESPACE,
        "quickstart",
        **{
            "output.uri": f"s3://{bucket}/runs",
            "output.credentialsSecret": SECRET,
            "promotion.target": target,
            "model.name": model,
        },
    )
    first = run.pod("train")
    counted = run.status()["model"]
    (initializer,) = (
        pod_plane.core()
        .list_namespaced_pod(
            NAMESPACE, label_selector=f"batch.kubernetes.io/job-name={run.name}-init"
        )
        .items
    )
    assert initializer.status.phase == "Succeeded"
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny).parameters())
    assert counted["parameters"] == parameters
    assert counted["name"] == model
    assert "staged" not in counted, "a model in the store the run writes to is read where it is"
    artifacts = f"{bucket}/runs/{NAMESPACE}/{run.name}/{run.uid}"
    checkpoint = f"{artifacts}/{CHECKPOINTS}/checkpoint-20/{COMPLETE_MARKER}"
    wait_for("checkpoint-20 in the store", lambda: store.exists(checkpoint), TRAINING_TIMEOUT)
    pod_runner.kill(run.namespace, first)

    second = run.pod("train", attempt=2)
    status = run.wait_phase("Succeeded")
    log = pod_runner.log(run.namespace, second)
    assert "resuming from" in log, log[-3000:]
    assert "checkpoint-20" in log, log[-3000:]
    steps = [
        int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("step ")
    ]
    assert steps, log[-3000:]
    assert steps[0] > 20, "the fresh pod went on from the store's checkpoint"
    report = json.loads(store.cat_file(f"{artifacts}/{TRAIN_REPORT}"))
    logged = [e["step"] for e in report["logHistory"] if "loss" in e]
    assert logged == sorted(set(logged)), "one unbroken loss curve, no step logged twice"
    assert logged[-1] == 60
    assert status["restarts"] == 1

    gate = json.loads(store.cat_file(f"{artifacts}/{EVAL_REPORT}"))
    current = json.loads(store.cat_file(f"{bucket}/promoted/quickstart/{CURRENT}"))
    assert status["evaluation"]["verdict"] == "Passed", status
    assert gate["adapterDigest"] == current["digest"] == status["promotion"]["digest"]
    assert current["uri"] == f"{target}/{VERSIONS}/{current['version']}"
    promoted = tmp_path_factory.mktemp("promoted") / current["version"]
    download_folder(
        store, f"{bucket}/promoted/quickstart/{VERSIONS}/{current['version']}", promoted
    )
    assert verify_manifest(promoted) == current["digest"], "every promoted file as recorded"
    served = json.loads((promoted / "adapter_config.json").read_text())
    assert served["base_model_name_or_path"] == model

    with pytest.raises(PermissionError):
        object_store.fs(anonymous=True).ls(bucket)
