"""A gang that must sit in one topology domain is refused, before any GPU is asked for, when no
domain can ever hold it; and only then."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from dpo_operator.core.lifecycle import Create, Observed, decide
from dpo_operator.core.topology import NodeCapacity, unsatisfiable_topology

from tests.conftest import job_with

BLOCK = "cloud.provider.com/topology-block"
NOW = datetime(2026, 12, 4, tzinfo=UTC)


def node(name: str, block: str | None, gpus: int = 8, **labels: str) -> NodeCapacity:
    placed = {BLOCK: block} if block else {}
    return NodeCapacity(name, {**placed, **labels}, {"nvidia.com/gpu": gpus})


# Two blocks of three 8-GPU nodes, and one node outside any block.
CLUSTER = (
    node("a-0", "a"),
    node("a-1", "a"),
    node("a-2", "a"),
    node("b-0", "b"),
    node("b-1", "b"),
    node("b-2", "b", gpus=4),
    node("lone", None),
)


def gang(nodes: int, policy: str = "Required", **scheduling: Any) -> Any:
    return job_with(
        model={"name": "org/model-7b", "initialize": False},
        resources={"nodes": nodes, "gpusPerNode": 8, "gpuMemory": "80Gi"},
        scheduling={"topologyKey": BLOCK, "topologyPolicy": policy, **scheduling},
    ).spec


def test_a_gang_that_fits_the_largest_block_is_not_refused() -> None:
    assert unsatisfiable_topology(gang(3), CLUSTER) is None


def test_a_gang_larger_than_every_block_is_refused_with_the_largest_and_the_fixes() -> None:
    problem = unsatisfiable_topology(gang(4), CLUSTER)
    assert problem == (
        f"scheduling.topologyPolicy is Required but no {BLOCK} domain can ever hold the 4 "
        "training pods of 8 nvidia.com/gpu: the largest, a, has 24 in all, room for 3; use "
        "scheduling.topologyPolicy: Preferred, a topologyKey whose domains are larger, or fewer "
        "resources.nodes"
    )


def test_a_node_with_too_few_gpus_for_one_pod_gives_the_gang_no_room() -> None:
    """Block b has 20 GPUs, but its 4-GPU node holds no 8-GPU pod: room for 2, not 3."""
    only_b = tuple(n for n in CLUSTER if n.labels.get(BLOCK) == "b")
    assert "the largest, b, has 20 in all, room for 2" in (
        unsatisfiable_topology(gang(3), only_b) or ""
    )


def test_the_node_selector_narrows_the_domains() -> None:
    h100 = tuple(
        node(
            n.name,
            n.labels.get(BLOCK),
            n.allocatable["nvidia.com/gpu"],
            product="H100" if n.name != "a-2" else "A100",
        )
        for n in CLUSTER
    )
    assert unsatisfiable_topology(gang(3, nodeSelector={"product": "H100"}), h100) is not None
    assert unsatisfiable_topology(gang(2, nodeSelector={"product": "H100"}), h100) is None


@pytest.mark.parametrize(
    ("spec", "nodes"),
    [
        (gang(4, policy="Preferred"), CLUSTER),  # packs where it can, places anyway
        (gang(4), ()),  # no Node to judge by: a cluster scaled to zero grows
    ],
    ids=["preferred", "no-nodes"],
)
def test_nothing_is_refused_where_the_gang_may_still_be_placed(spec: Any, nodes: Any) -> None:
    assert unsatisfiable_topology(spec, nodes) is None


def test_a_key_no_node_carries_is_named() -> None:
    problem = unsatisfiable_topology(gang(2, topologyKey="example.com/rack"), CLUSTER)
    assert problem is not None
    assert problem.startswith(
        "scheduling.topologyPolicy is Required but no Node has the label example.com/rack "
        "(scheduling.topologyKey): check the key"
    )


def test_the_run_fails_before_its_training_job_is_created() -> None:
    job = job_with(
        model={"name": "org/model-7b", "initialize": False},
        resources={"nodes": 4, "gpusPerNode": 8, "gpuMemory": "80Gi"},
        scheduling={"topologyKey": BLOCK, "topologyPolicy": "Required"},
    )
    decision = decide(job, Observed(now=NOW, has_config_map=True, has_service=True, nodes=CLUSTER))
    assert decision.status.phase == "Failed"
    assert decision.status.conditions[-1].reason == "TopologyUnsatisfiable"
    assert not any(isinstance(a, Create) and a.kind == "train" for a in decision.actions)
    fits = Observed(now=NOW, has_config_map=True, has_service=True, nodes=CLUSTER[:3])
    assert Create("train", 1) not in decide(job, fits).actions, "one block of 3 still too small"
    roomy = (*CLUSTER, node("a-3", "a"))
    placed = decide(job, Observed(now=NOW, has_config_map=True, has_service=True, nodes=roomy))
    assert Create("train", 1) in placed.actions
