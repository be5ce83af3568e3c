"""Models and field types that the DPOJob spec and trainer.json share: the model, the data
sources and columns, LoRA settings and the loss types TRL takes.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from pydantic.alias_generators import to_camel

# The loss types TRL's DPOConfig accepts (trl>=1.0, `DPOConfig.loss_type`), plus reference-free
# SimPO, which runs through TRL's CPO trainer and so cannot be combined with the others. The
# trainer test tier checks this list against the installed TRL so it cannot drift.
LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "simpo",
]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
SIMPO = "simpo"
DPO_LOSS_TYPES: tuple[str, ...] = tuple(t for t in LOSS_TYPES if t != SIMPO)

ShortStr = Annotated[str, Field(min_length=1, max_length=253)]
UriStr = Annotated[str, Field(min_length=1, max_length=1024)]
# The object stores the trainer reads models and data from (fsspec; file:// stands in for a
# bucket in tests). pvc:// the operator turns into a mounted path.
STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "file")
# The name a model is served under (the serve line's argument, adapter_config.json's
# base_model_name_or_path, an OCI annotation): never a flag, never a space or control character.
ServedName = Annotated[
    str,
    Field(min_length=1, max_length=1024, pattern=r"^[^-\s\x00-\x1f\x7f][^\s\x00-\x1f\x7f]*$"),
]


class ContractModel(BaseModel):
    """Base of every contract and API model: camelCase in JSON/YAML, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


class ModelRef(ContractModel):
    """A model by hub id, local path or storage URI, at an optional revision."""

    name: UriStr = Field(
        description="Hub id (org/model), local path, or storage URI (pvc://claim/path, s3://...).",
    )
    revision: ShortStr | None = Field(
        default=None, description="Hub branch, tag or commit; pin it for reproducible runs."
    )


class PolicyRef(ModelRef):
    """The model to train as trainer.json names it: where it lives, and the copy the model
    initializer made of it in the run's storage, which the pods read instead."""

    staged: UriStr | None = Field(
        default=None,
        description="<run>/base-model (a path or URI) once the initializer wrote it; None: the "
        "pods read `name`.",
    )


class DataSource(ContractModel):
    """Preference pairs: a hub dataset (`name` + `split`) or jsonl/parquet files (`uri`); the
    DPOJob API requires exactly one (`dpo_operator.api.DataSourceSpec`)."""

    name: ShortStr | None = Field(default=None, description="Hub dataset id, e.g. org/prefs.")
    split: ShortStr = Field(default="train", description="Dataset split (hub datasets only).")
    revision: ShortStr | None = Field(default=None, description="Hub dataset revision.")
    uri: UriStr | None = Field(
        default=None,
        description="jsonl or parquet file(s): local path, pvc://claim/path or s3://bucket/key.",
    )


class ColumnMapping(ContractModel):
    """Names of the dataset's own columns holding the prompt, chosen and rejected responses."""

    prompt: ShortStr = Field(default="prompt", description="Column with the prompt.")
    chosen: ShortStr = Field(default="chosen", description="Column with the preferred response.")
    rejected: ShortStr = Field(
        default="rejected", description="Column with the dispreferred response."
    )


DataFormat = Literal["auto", "standard", "conversational"]


class LoraSettings(ContractModel):
    """LoRA adapter settings (PEFT)."""

    r: StrictInt = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: StrictInt = Field(default=32, ge=1, le=4096, description="LoRA scaling alpha.")
    dropout: StrictFloat = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default=["all-linear"],
        max_length=64,
        description='Modules to adapt; ["all-linear"] adapts every linear layer but the head.',
    )
