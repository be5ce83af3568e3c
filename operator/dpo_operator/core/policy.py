"""What the cluster admin allows a DPOJob beyond what the API allows everyone: pure checks of a
DPOJob against the operator's settings (`render.Settings`, set by the chart).

The API cannot hold these rules: they differ per installation and per namespace. The operator
refuses a DPOJob that breaks one as it refuses an invalid spec (SpecValid=False, an Event), and
`dpo render` refuses to print it.
"""

from __future__ import annotations

from collections.abc import Mapping

from dpo_operator.api import DPOJob
from dpo_operator.core.network import PROFILES
from dpo_operator.core.settings import Settings


def refusals(job: DPOJob, settings: Settings) -> list[str]:
    """One line per setting of `job` the admin does not allow in its namespace, each naming the
    field, the boundary and who can move it."""
    problems: list[str] = []
    namespace = job.namespace
    profile = job.spec.network.profile
    allowed = allowed_profiles(namespace, settings)
    # On CPUs every profile renders as plain TCP: nothing privileged runs.
    if not settings.cpu and profile not in allowed:
        host_access = PROFILES[profile].host_access
        why = f" ({host_access})" if host_access else ""
        problems.append(
            f"spec.network.profile: {profile}{why} is not allowed in namespace {namespace}; "
            f"allowed here: {', '.join(sorted(allowed)) or 'none'}. The cluster admin allows "
            "profiles per namespace with the chart value network.allowedProfiles"
        )
    priority = job.spec.scheduling.priority_class_name
    classes = allowed_priority_classes(namespace, settings)
    if priority is not None and priority.startswith("system-"):
        problems.append(
            f"spec.scheduling.priorityClassName: {priority} is for the cluster's own pods (it "
            "would preempt them, node agents included) and never a DPOJob's; use one of your "
            "cluster's PriorityClasses for workloads"
        )
    elif priority is not None and classes is not None and priority not in classes:
        problems.append(
            f"spec.scheduling.priorityClassName: {priority} is not allowed in namespace "
            f"{namespace}; allowed here: {', '.join(sorted(classes)) or 'none'}. The cluster "
            "admin allows PriorityClasses per namespace with the chart value "
            "scheduling.allowedPriorityClasses"
        )
    roots = promotion_roots(namespace, settings)
    promotion = job.spec.promotion
    if (
        promotion is not None
        and roots is not None
        and not any(is_under(promotion.target, root) for root in roots)
    ):
        problems.append(
            f"spec.promotion.target: {promotion.target} is outside what namespace {namespace} "
            f"may promote to ({', '.join(roots) or 'nothing'}); choose a target under one of "
            "these, or ask the cluster admin (chart value promotion.roots)"
        )
    return problems


def allowed_profiles(namespace: str, settings: Settings) -> frozenset[str]:
    return _in_namespace(settings.allowed_profiles, namespace)


def allowed_priority_classes(namespace: str, settings: Settings) -> frozenset[str] | None:
    """The PriorityClasses `namespace` may use; None when the admin listed none."""
    if not settings.allowed_priority_classes:
        return None
    return _in_namespace(settings.allowed_priority_classes, namespace)


def _in_namespace(allowed: Mapping[str, frozenset[str]], namespace: str) -> frozenset[str]:
    """What an admin's per-namespace list allows `namespace`: its own and every one's ("*")."""
    return allowed.get("*", frozenset()) | allowed.get(namespace, frozenset())


def promotion_roots(namespace: str, settings: Settings) -> tuple[str, ...] | None:
    """The prefixes `namespace` may promote under; None when the admin set no boundary."""
    if not settings.promotion_roots:
        return None
    templates = settings.promotion_roots.get("*", ()) + settings.promotion_roots.get(namespace, ())
    return tuple(template.replace("{namespace}", namespace) for template in templates)


def is_under(uri: str, root: str) -> bool:
    """Whether `uri` is `root` or below it, by whole path segments (s3://m/team-a is not under
    s3://m/team); a root that is only a scheme (pvc://) admits everything of that scheme."""
    if root.endswith("://"):
        return uri.startswith(root)
    base = root.rstrip("/")
    return uri == base or uri.startswith(base + "/")
