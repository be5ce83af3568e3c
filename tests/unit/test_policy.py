"""What the cluster admin allows: privileged network profiles per namespace, the TCPXO daemon's
image, and where each namespace may promote to. A DPOJob cannot choose any of them."""

from __future__ import annotations

import pytest
from dpo_operator.api import DPOJob, describe_errors
from dpo_operator.cli.main import build_parser, main, settings_from_args
from dpo_operator.core.policy import is_under, refusals
from dpo_operator.core.render import render_training_job
from dpo_operator.core.resolve import resolve
from dpo_operator.core.settings import Settings
from dpo_operator.core.validate import parse_dpojob
from pydantic import ValidationError

from tests.conftest import REPO, example, example_manifest

TCPXO_IN_ML = Settings(allowed_profiles={"*": frozenset({"tcp"}), "ml": frozenset({"tcpxo"})})


def in_namespace(name: str, namespace: str) -> DPOJob:
    manifest = example_manifest(name)
    manifest["metadata"]["namespace"] = namespace
    return parse_dpojob(manifest)


def test_a_dpojob_cannot_choose_the_tcpxo_daemon_image() -> None:
    manifest = example_manifest("tcpxo")
    manifest["spec"]["network"]["tcpxoDaemonImage"] = "evil.example/rootkit:latest"
    with pytest.raises(ValidationError) as refused:
        parse_dpojob(manifest)
    (problem,) = describe_errors(refused.value)
    assert problem.startswith("spec.network.tcpxoDaemonImage: removed")
    assert "network.tcpxo.daemonImage" in problem


def test_the_tcpxo_daemon_runs_the_image_the_admin_pinned() -> None:
    pinned = Settings(tcpxo_daemon_image="registry.corp/tcpxo-daemon@sha256:" + "a" * 64)
    pod = render_training_job(resolve(example("tcpxo"), pinned), 1)["spec"]["template"]
    (daemon,) = pod["spec"]["initContainers"]
    assert daemon["image"] == pinned.tcpxo_daemon_image


def test_tcpxo_is_refused_where_the_admin_did_not_allow_it() -> None:
    job = in_namespace("tcpxo", "team-a")
    (problem,) = refusals(job, TCPXO_IN_ML)
    assert problem.startswith("spec.network.profile: tcpxo (its receive-datapath daemon runs with")
    assert "not allowed in namespace team-a; allowed here: tcp." in problem
    assert "network.allowedProfiles" in problem
    assert refusals(in_namespace("tcpxo", "ml"), TCPXO_IN_ML) == []


def test_by_default_every_profile_without_host_access_is_allowed_and_tcpxo_is_not() -> None:
    for name in ("llama-8b-lora-infiniband", "full-finetune-hsdp-efa", "quickstart"):
        assert refusals(example(name), Settings()) == []
    assert refusals(example("tcpxo"), Settings())


@pytest.mark.parametrize(
    ("target", "root", "under"),
    [
        ("s3://models/team-a/llama", "s3://models/team-a", True),
        ("s3://models/team-a", "s3://models/team-a/", True),
        ("s3://models/team-ab/llama", "s3://models/team-a", False),
        ("pvc://any-claim/x", "pvc://", True),
        ("s3://models/team-a/x", "pvc://", False),
    ],
)
def test_a_target_is_under_a_root_by_whole_segments(target: str, root: str, under: bool) -> None:
    assert is_under(target, root) is under


def test_a_namespace_may_promote_only_under_its_roots() -> None:
    settings = Settings(promotion_roots={"*": ("s3://acme-models/{namespace}/",)})
    job = in_namespace("llama-8b-lora-infiniband", "team-b")  # s3://acme-models/adapters/...
    (problem,) = refusals(job, settings)
    assert problem.startswith(
        "spec.promotion.target: s3://acme-models/adapters/llama-8b-ultrafeedback is outside what "
        "namespace team-b may promote to (s3://acme-models/team-b/)"
    )
    allowed = Settings(promotion_roots={"team-b": ("s3://acme-models/adapters",)})
    assert refusals(job, allowed) == []


def test_dpo_render_refuses_what_the_operator_would_refuse(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["render", str(REPO / "examples" / "tcpxo.yaml")])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert "spec.network.profile: tcpxo" in captured.err
    code = main(
        ["render", str(REPO / "examples" / "tcpxo.yaml"), "--allow-profiles", "default=tcpxo"]
    )
    assert code == 0
    assert "tcpxo-daemon" in capsys.readouterr().out


def test_system_priority_classes_are_never_a_dpojobs_and_an_allowlist_binds() -> None:
    def with_priority(name: str, namespace: str = "ml") -> DPOJob:
        job = in_namespace("quickstart", namespace)
        scheduling = job.spec.scheduling.model_copy(update={"priority_class_name": name})
        return job.model_copy(
            update={"spec": job.spec.model_copy(update={"scheduling": scheduling})}
        )

    (problem,) = refusals(with_priority("system-node-critical"), Settings())
    assert problem.startswith(
        "spec.scheduling.priorityClassName: system-node-critical is for the cluster's own pods"
    )
    assert refusals(with_priority("dpo-low"), Settings()) == [], "no list: any but system-*"
    listed = Settings(allowed_priority_classes={"*": frozenset({"dpo-low"})})
    assert refusals(with_priority("dpo-low"), listed) == []
    (problem,) = refusals(with_priority("dpo-high"), listed)
    assert "dpo-high is not allowed in namespace ml; allowed here: dpo-low" in problem
    prod = Settings(
        allowed_priority_classes={"*": frozenset({"dpo-low"}), "prod": frozenset({"dpo-high"})}
    )
    assert refusals(with_priority("dpo-high", "prod"), prod) == []
    assert refusals(with_priority("system-cluster-critical", "prod"), prod)


def test_the_operator_takes_the_priority_class_allowlist_from_its_flags() -> None:
    args = build_parser().parse_args(
        ["operator", "--all-namespaces", "--allow-priority-classes=*=dpo-low",
         "--allow-priority-classes=prod=dpo-high,dpo-urgent"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert settings.allowed_priority_classes == {
        "*": frozenset({"dpo-low"}),
        "prod": frozenset({"dpo-high", "dpo-urgent"}),
    }
