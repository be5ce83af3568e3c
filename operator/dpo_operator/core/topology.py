"""Whether a gang that must sit in one topology domain (`scheduling.topologyPolicy: Required`)
can ever be placed: Kueue's topology-aware scheduling, or the scheduler's required affinity,
would keep a gang bigger than every domain pending for ever, holding its place in the queue.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dpo_operator.api import DPOJobSpec


@dataclass(frozen=True)
class NodeCapacity:
    """What the check reads of a Node: its labels and what it can allocate (GPUs by resource
    name)."""

    name: str
    labels: Mapping[str, str]
    allocatable: Mapping[str, int]


def unsatisfiable_topology(spec: DPOJobSpec, nodes: Sequence[NodeCapacity]) -> str | None:
    """Why the training pods can never all be placed in one `topologyKey` domain, counting every
    Node the nodeSelector admits (ready or not: one may come back); None when they can, when
    the policy is Preferred, or when there are no Nodes to judge by (a cluster scaled to zero)."""
    scheduling, resources = spec.scheduling, spec.resources
    key = scheduling.topology_key
    per_pod = resources.gpus_per_node
    if key is None or scheduling.topology_policy != "Required" or per_pod == 0 or not nodes:
        return None
    selected = [
        node
        for node in nodes
        if all(node.labels.get(k) == v for k, v in scheduling.node_selector.items())
    ]
    resource = resources.gpu_resource_name
    wanted = resources.nodes
    fixes = (
        "use scheduling.topologyPolicy: Preferred, a topologyKey whose domains are larger, or "
        "fewer resources.nodes"
    )
    domains = [node for node in selected if key in node.labels]
    if not domains:
        where = " matching scheduling.nodeSelector" if scheduling.node_selector else ""
        return (
            f"scheduling.topologyPolicy is Required but no Node{where} has the label {key} "
            f"(scheduling.topologyKey): check the key, or {fixes}"
        )
    slots: dict[str, int] = defaultdict(int)
    gpus: dict[str, int] = defaultdict(int)
    for node in domains:
        held = node.allocatable.get(resource, 0)
        slots[node.labels[key]] += held // per_pod
        gpus[node.labels[key]] += held
    largest = max(slots, key=lambda domain: (slots[domain], domain))
    if slots[largest] >= wanted:
        return None
    return (
        f"scheduling.topologyPolicy is Required but no {key} domain can ever hold the "
        f"{wanted} training pods of {per_pod} {resource}: the largest, {largest}, has "
        f"{gpus[largest]} in all, room for {slots[largest]}; {fixes}"
    )
