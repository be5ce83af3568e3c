"""What rendering takes besides the DPOJob: the installation's settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from dpo_operator.api import OutputSpec
from dpo_operator.core.network import DEFAULT_ALLOWED_PROFILES, DEFAULT_TCPXO_DAEMON_IMAGE


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
    (`dpo_operator.core.policy` checks both).
    """

    trainer_image: str = DEFAULT_TRAINER_IMAGE  # for DPOJobs that set no spec.image
    tcpxo_daemon_image: str = DEFAULT_TCPXO_DAEMON_IMAGE
    allowed_profiles: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: {"*": frozenset(DEFAULT_ALLOWED_PROFILES)}
    )
    # URI prefixes promotion targets must lie under, per namespace ("*": every namespace;
    # "{namespace}" in a prefix is the DPOJob's). None configured: no boundary.
    promotion_roots: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # PriorityClasses each namespace's pods may use ("*": every namespace). None configured:
    # any but the system ones (system-*), which are never a DPOJob's.
    allowed_priority_classes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # The NetworkPolicy of each namespace with DPOJobs: who besides the trainers themselves may
    # reach their metrics port (the operator's namespace, and those of the Prometheus that
    # scrape them). network_policy False: none is created.
    network_policy: bool = True
    operator_namespace: str = "dpo-system"
    metrics_scrapers: tuple[str, ...] = ()
    cpu: bool = False  # the job's process layout on CPUs (`dpo run --cpu`, tests)
    # Where the artifacts of a DPOJob that names no spec.output go (None: it must name one).
    default_output: OutputSpec | None = None


DEFAULT_SETTINGS = Settings()
