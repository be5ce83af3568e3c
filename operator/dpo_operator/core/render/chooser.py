"""A DPOSweep's chooser: one CPU pod from the trainer image that reads the eval.json of every
trial whose gate passed and compares them pair against pair (`dpo-trainer choose`). It reaches
the trials' artifacts as their gates did: it is rendered as the first compared trial's pod, so
it mounts the same volumes and reads the same credentials, and is owned by the sweep."""

from __future__ import annotations

from dpo_contract.pod import EXIT_BAD_INPUT

from dpo_operator.api.sweep import SWEEP_KIND, DPOSweep
from dpo_operator.core.names import LABEL_JOB, controller_reference
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.render.pod import single_pod_job
from dpo_operator.core.resolve import ResolvedJob
from dpo_operator.core.storage import artifacts_dir

CHOOSER_LABEL = "dpo.dev/chooser"
CHOOSER_CPU = "1"
CHOOSER_MEMORY = "1Gi"


def chooser_name(sweep: str) -> str:
    return f"{sweep}-choose"


def render_chooser(sweep: DPOSweep, trials: dict[int, ResolvedJob]) -> Manifest:
    """The chooser comparing `trials` (trial number -> the trial resolved, with its uid)."""
    first = trials[min(trials)]
    manifest = single_pod_job(
        first,
        chooser_name(sweep.name),
        "choose",
        1,
        0,
        CHOOSER_CPU,
        CHOOSER_MEMORY,
        [EXIT_BAD_INPUT],
    )
    for metadata in (manifest["metadata"], manifest["spec"]["template"]["metadata"]):
        # The sweep's, not the trial's: the trial's controller never sees it.
        metadata["labels"].pop(LABEL_JOB)
        metadata["labels"][CHOOSER_LABEL] = sweep.name
        metadata["labels"]["app.kubernetes.io/instance"] = sweep.name
    metadata = manifest["metadata"]
    metadata.pop("ownerReferences", None)
    if sweep.metadata.uid:
        metadata["ownerReferences"] = [
            controller_reference(SWEEP_KIND, sweep.name, sweep.metadata.uid)
        ]
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    container["command"] = ["dpo-trainer", "choose"] + [
        f"--trial={number}={artifacts_dir(resolved.job)}@{resolved.spec.dpo.beta}"
        for number, resolved in sorted(trials.items())
    ]
    return manifest
