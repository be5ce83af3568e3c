"""The spec groups that say what happens to the result: the eval gate, the promotion target
and where outputs are written.
"""

from __future__ import annotations

from typing import Annotated, Literal

from dpo_contract.fields import ContractModel
from pydantic import Field, StrictFloat, StrictInt, field_validator

from dpo_operator.api.cel import Rule, RuledModel
from dpo_operator.api.grammar import (
    PROMOTION_TARGET_PATTERN,
    SERVED_NAME_PATTERN,
    STORAGE_URI_PATTERN,
    K8sName,
    PromotionTarget,
    Quantity,
    StorageUri,
    check_quantity,
    explain_uri,
    uri_rules,
)
from dpo_operator.api.training import DataSourceSpec


class PodResources(ContractModel):
    """Resources of a single-pod Job; unset values follow spec.resources."""

    gpus: StrictInt | None = Field(
        default=None, ge=0, le=16, description="GPUs (default: 1 if training uses GPUs)."
    )
    cpu: Quantity | None = Field(default=None, description="CPU request.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit.")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str | int | None) -> str | None:
        return None if value is None else check_quantity(value)


class EvalGateSpec(RuledModel):
    """The held-out gate: an adapter is promoted only if every set threshold holds; a threshold
    set to null is not checked."""

    rules = (
        Rule(
            # has(): the API server also checks the group's default, {}, against its rules.
            "!has(self.enabled) || !self.enabled || self.mustBeatPromoted || "
            + " || ".join(
                # A null threshold (nullable in the CRD) is a null_type, not a double.
                f"(has(self.{name}) && type(self.{name}) == double)"
                for name in ("minRewardAccuracy", "minRewardMargin", "maxAnchorNllIncrease")
            ),
            "every criterion is off (null), so the gate would pass anything; set one of "
            "minRewardAccuracy, minRewardMargin, maxAnchorNllIncrease or mustBeatPromoted",
        ),
        Rule(
            "!has(self.minRewardAccuracy) || type(self.minRewardAccuracy) != double || "
            "self.minRewardAccuracy > 0.0",
            "0 can never fail (no accuracy is below 0), so it would pass any adapter; set it "
            "above 0 (e.g. 0.6), or null to turn the check off",
            ".minRewardAccuracy",
        ),
    )

    enabled: bool = Field(default=True, description="Run the gate after training.")
    data: DataSourceSpec | None = Field(
        default=None, description="Held-out pairs for the gate (default: spec.data.eval)."
    )
    anchor_data: DataSourceSpec | None = Field(
        default=None,
        description="Texts for the drift check (default: the held-out chosen responses).",
    )
    max_samples: StrictInt | None = Field(
        default=None, ge=1, description="Evaluate at most this many pairs."
    )
    min_reward_accuracy: StrictFloat | None = Field(
        default=0.6, ge=0, le=1, description="Fraction of held-out pairs ranked correctly."
    )
    min_reward_margin: StrictFloat | None = Field(
        default=0.0, description="Mean implicit reward margin (chosen - rejected)."
    )
    max_anchor_nll_increase: StrictFloat | None = Field(
        default=0.2,
        ge=0,
        description="Largest allowed relative rise of per-token NLL on the anchor set versus the "
        "reference (0.2 = 20%): catches drift and reward hacking.",
    )
    must_beat_promoted: bool = Field(
        default=False, description="Also require beating the currently promoted adapter."
    )
    beat_margin: StrictFloat = Field(
        default=0.0, ge=0, description="Reward accuracy the new adapter must add over it."
    )
    confidence: StrictFloat = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        description="Each criterion must hold for its whole interval at this confidence; an "
        "estimate that holds on too few pairs to be sure is Inconclusive (not promoted).",
    )
    resources: PodResources = Field(default_factory=PodResources)


class PromotionSpec(RuledModel):
    """Where a gated adapter is published."""

    rules = (
        *uri_rules("target"),
        Rule(
            "!self.plainHttp || self.target.startsWith('oci://')",
            "talks to an OCI registry without TLS; only an oci:// target has one: remove it",
            ".plainHttp",
        ),
    )

    target: PromotionTarget = Field(
        description="Adapters land in <target>/versions/<version>/ and <target>/current points at "
        "the newest. oci://<registry>/<repository>: pushed as an OCI artifact tagged with its "
        "version and moved to the tag current, the gate report attached as a referrer."
    )
    mode: Literal["auto", "manual"] = Field(
        default="auto",
        description="manual waits, after the gate passed, for the annotation dpo.dev/approve "
        "naming the digest of the adapter it passed (status.evaluation.adapterDigest); an "
        "approval set before the verdict, or for another adapter, is ignored.",
    )
    served_model_name: (
        Annotated[str, Field(min_length=1, max_length=256, pattern=SERVED_NAME_PATTERN)] | None
    ) = Field(
        default=None,
        description="The base model's name where the adapter is served (vLLM's model or "
        "--served-model-name), written to the adapter's adapter_config.json as "
        "base_model_name_or_path. Default: model.name.",
    )

    plain_http: bool = Field(
        default=False,
        description="oci:// only: HTTP instead of HTTPS, for a registry inside the cluster "
        "without TLS. Credentials: OCI_USERNAME and OCI_PASSWORD in output.credentialsSecret.",
    )

    @field_validator("target", mode="before")
    @classmethod
    def _explain_target(cls, value: object) -> object:
        return explain_uri(value, PROMOTION_TARGET_PATTERN, "promotion target")


class OutputSpec(RuledModel):
    """Where checkpoints, adapters and reports go."""

    rules = uri_rules("uri")

    uri: StorageUri = Field(
        description="pvc://<claim>/<path> or an object store URI; artifacts go to "
        "<uri>/<namespace>/<name>/<uid>/."
    )
    credentials_secret: K8sName | None = Field(
        default=None,
        description="Secret whose keys become env vars of every pod (e.g. AWS_ACCESS_KEY_ID).",
    )

    @field_validator("uri", mode="before")
    @classmethod
    def explain_uri(cls, value: object) -> object:
        return explain_uri(value, STORAGE_URI_PATTERN, "storage URI")
