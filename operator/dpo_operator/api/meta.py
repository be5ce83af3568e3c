"""The resource's identity (group, version, kind) and the part of ObjectMeta the operator reads."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

GROUP = "dpo.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DPOJob"
PLURAL = "dpojobs"
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes' ObjectMeta: the fields the API server sets or keeps besides those read here.
OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)


class ObjectMeta(BaseModel):
    """The part of metadata the operator reads; the rest of Kubernetes' ObjectMeta (what the API
    server adds) is ignored, and any other field refused, as the API server refuses it."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _only_object_meta(cls, document: Any) -> Any:
        if isinstance(document, dict):
            unknown = sorted(str(key) for key in document if key not in OBJECT_META_FIELDS)
            if unknown:
                raise ValueError(
                    f"unknown field {', '.join(unknown)}: not a field of Kubernetes' ObjectMeta; "
                    "remove it (labels or annotations hold free-form data)"
                )
        return document

    name: str  # checked by a DPOJob rule (metadata has no schema in a CRD)
    # What the API server accepts (an RFC 1123 label): `dpo run` makes directories of it.
    namespace: str = Field(default="default", max_length=63, pattern=NAMESPACE_PATTERN)
    uid: str | None = None
    generation: StrictInt | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
