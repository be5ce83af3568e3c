"""The eval gate: score a trained adapter on held-out pairs; pass only if every criterion holds.

Criteria (each reported with value, threshold and verdict in eval.json):
- rewardAccuracy >= minRewardAccuracy: share of held-out pairs the implicit reward ranks right;
- rewardMargin >= minRewardMargin: mean implicit reward of chosen minus rejected;
- anchorNllIncrease <= maxAnchorNllIncrease: relative rise of the per-token NLL on an anchor set
  (default: the held-out chosen responses) over the starting model's; catches drift and reward
  hacking that training loss does not show;
- beatsPromoted (with mustBeatPromoted): held-out reward accuracy above the promoted adapter's
  by more than beatMargin.
The implicit reward is the one the loss trains: beta * (log pi - log ref) summed over the
response; per token for sigmoid_norm; beta * mean log pi for reference-free SimPO.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpo_trainer.artifacts import ADAPTER, EVAL_REPORT, Artifacts, verify_manifest
from dpo_trainer.config import (
    BadInputError,
    GateConfig,
    GateCriterion,
    GateReport,
    ModelRef,
    TrainerConfig,
)
from dpo_trainer.data import load_preferences
from dpo_trainer.distributed import require_gpus
from dpo_trainer.models import load_model, load_tokenizer, torch_dtype
from dpo_trainer.promote import promoted_adapter

log = logging.getLogger(__name__)

BATCH_SIZE = 16


@dataclass(frozen=True)
class Scores:
    """Per-pair sums of response log-probs and response lengths, chosen and rejected."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass(frozen=True)
class Criterion:
    name: str
    value: float | None
    relation: str  # how value must compare with threshold: ">=", "<=" or ">"
    threshold: float
    passed: bool

    def reported(self) -> GateCriterion:
        return GateCriterion(
            name=self.name, value=self.value, threshold=self.threshold, passed=self.passed
        )

    def describe(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.4f}"
        return f"{self.name} {value} (needs {self.relation} {self.threshold})"


def _check(name: str, value: float, relation: str, threshold: float | None) -> list[Criterion]:
    """The criterion, or none when its threshold is not set."""
    if threshold is None:
        return []
    passed = {">=": value >= threshold, "<=": value <= threshold, ">": value > threshold}
    return [Criterion(name, value, relation, threshold, passed[relation])]


def evaluate(config: TrainerConfig) -> GateReport:
    """Run the gate; returns the eval report (also written to eval.json)."""
    gate = config.gate
    if gate is None:
        raise BadInputError("trainer.json has no gate: set spec.evalGate and held-out data")
    require_gpus(gate.gpus, "trainer.json (gate.gpus)")
    artifacts = Artifacts(config.artifacts_dir)
    adapter_dir = artifacts.fetch(ADAPTER)
    if not adapter_dir.exists():
        raise BadInputError(
            f"{adapter_dir}: no trained adapter; the training Job must succeed first"
        )
    digest = verify_manifest(adapter_dir)

    pairs, report = load_preferences(gate.data, config.data.columns, config.data.format)
    pairs = pairs[: gate.max_samples] if gate.max_samples else pairs
    anchors = pairs
    if gate.anchor_data is not None:
        anchors, _ = load_preferences(gate.anchor_data, config.data.columns, config.data.format)
        anchors = anchors[: gate.max_samples] if gate.max_samples else anchors

    scorer = Scorer(config)
    # One model at a time: each is released before the next is loaded.
    new, new_anchor = scorer.scored(scorer.policy(adapter_dir), pairs, anchors)
    ref, ref_anchor = scorer.scored(scorer.reference(), pairs, anchors)

    rewards = scorer.rewards(new, ref)
    drift = (new_anchor - ref_anchor) / ref_anchor
    criteria = [
        *_check("rewardAccuracy", rewards["accuracy"], ">=", gate.min_reward_accuracy),
        *_check("rewardMargin", rewards["margin"], ">=", gate.min_reward_margin),
        *_check("anchorNllIncrease", drift, "<=", gate.max_anchor_nll_increase),
    ]
    champion = None
    if gate.must_beat_promoted and config.promotion is not None:
        champion, beaten = _beats_promoted(config, gate, scorer, pairs, ref, rewards, digest)
        criteria += beaten
    failed = [c for c in criteria if not c.passed]
    result = GateReport(
        status="rejected" if failed else "passed",
        verdict="Rejected" if failed else "Passed",
        adapter_digest=digest,
        criteria=[c.reported() for c in criteria],
        message="gate rejected: " + "; ".join(c.describe() for c in failed) if failed else None,
        metrics={
            "rewardAccuracy": rewards["accuracy"],
            "rewardMargin": rewards["margin"],
            "rewardChosen": rewards["chosen"],
            "rewardRejected": rewards["rejected"],
            "anchorNll": new_anchor,
            "referenceAnchorNll": ref_anchor,
            "anchorNllIncrease": drift,
        },
        pairs=len(pairs),
        data=report,
        champion_digest=champion,
    )
    artifacts.write_report(EVAL_REPORT, result)
    for criterion in criteria:
        log.info("gate: %s -> %s", criterion.describe(), "pass" if criterion.passed else "FAIL")
    return result


def _beats_promoted(
    config: TrainerConfig,
    gate: GateConfig,
    scorer: Scorer,
    pairs: list[dict[str, Any]],
    ref: Scores,
    rewards: dict[str, float],
    digest: str,
) -> tuple[str, list[Criterion]]:
    """The digest of the promoted adapter ("" when none) and the beatsPromoted criterion."""
    assert config.promotion is not None
    current = promoted_adapter(config.promotion.target)
    if current is None:
        log.info("nothing promoted at %s yet: beatsPromoted passes", config.promotion.target)
        return "", [Criterion("beatsPromoted", None, ">", gate.beat_margin, True)]
    current_dir, current_digest = current
    if current_digest == digest:
        raise BadInputError(
            f"this adapter ({digest}) is already the promoted one at {config.promotion.target}"
        )
    with scorer.policy(current_dir) as promoted:
        promoted_rewards = scorer.rewards(scorer.score(promoted, pairs), ref)
    delta = rewards["accuracy"] - promoted_rewards["accuracy"]
    return current_digest, _check("beatsPromoted", delta, ">", gate.beat_margin)


class Scorer:
    """Tokenizes pairs like TRL does and sums response log-probs under a model."""

    def __init__(self, config: TrainerConfig) -> None:
        assert config.gate is not None
        gpus = config.gate.gpus
        self.config = config
        self.beta = config.training.beta
        self.loss_type = config.training.loss_type
        self.dtype = torch_dtype(config.training.mixed_precision)
        # Inputs go to the first GPU; a model too large for one is spread over all of them.
        self.device = torch.device("cuda" if gpus else "cpu")
        self.device_map = "auto" if gpus > 1 else None
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self._base: Any = None

    def _load(self, ref: ModelRef) -> Any:
        model = load_model(
            ref,
            trust_remote_code=self.config.trust_remote_code,
            dtype=self.dtype,
            device_map=self.device_map,
        )
        return self._placed(model).eval()

    def _placed(self, model: Any) -> Any:
        return model if self.device_map else model.to(self.device)

    def scored(
        self,
        model: contextlib.AbstractContextManager[Any],
        pairs: list[dict[str, Any]],
        anchors: list[dict[str, Any]],
    ) -> tuple[Scores, float]:
        """The pairs' scores and the anchor NLL under `model`, which is released afterwards."""
        with model as loaded:
            return self.score(loaded, pairs), self.anchor_nll(loaded, anchors)

    @contextlib.contextmanager
    def policy(self, adapter_dir: Path) -> Iterator[Any]:
        """The trained policy: base + LoRA adapter, or the saved full model."""
        if self.config.lora is None:
            model = self._load(ModelRef(name=str(adapter_dir)))
            yield model
            del model
            return
        from peft import PeftModel

        if self._base is None:
            self._base = self._load(self.config.model)
        model = self._placed(PeftModel.from_pretrained(self._base, str(adapter_dir))).eval()
        try:
            yield model
        finally:
            self._base = model.unload()  # the base weights, without the adapter

    @contextlib.contextmanager
    def reference(self) -> Iterator[Any]:
        """The starting point: the separate reference if any, else the base model."""
        if self.config.reference is not None:
            yield self._load(self.config.reference)
            return
        if self._base is None:
            self._base = self._load(self.config.model)
        yield self._base

    def _tokenize(self, prompt: Any, completion: Any) -> tuple[list[int], int]:
        tokenizer = self.tokenizer
        if isinstance(prompt, list):
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(prompt + completion)
        else:
            prompt_ids = tokenizer(prompt)["input_ids"]
            full = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
        start = 0
        while start < min(len(prompt_ids), len(full)) and prompt_ids[start] == full[start]:
            start += 1
        return list(full[: self.config.training.max_length]), start

    def _sequence_logps(
        self, model: Any, texts: list[tuple[Any, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = [], []
        pad = self.tokenizer.pad_token_id
        for begin in range(0, len(texts), BATCH_SIZE):
            encoded = [self._tokenize(p, c) for p, c in texts[begin : begin + BATCH_SIZE]]
            width = max(len(ids) for ids, _ in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            completion = torch.zeros_like(ids)
            for row, (sequence, start) in enumerate(encoded):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                attention[row, : len(sequence)] = 1
                completion[row, start : len(sequence)] = 1
            ids, attention, completion = (t.to(self.device) for t in (ids, attention, completion))
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            per_token = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            mask = completion[:, 1:].float()
            sums.append((per_token * mask).sum(-1).cpu())
            counts.append(mask.sum(-1).cpu())
        return torch.cat(sums), torch.cat(counts)

    def score(self, model: Any, pairs: list[dict[str, Any]]) -> Scores:
        chosen, chosen_tokens = self._sequence_logps(
            model, [(p["prompt"], p["chosen"]) for p in pairs]
        )
        rejected, rejected_tokens = self._sequence_logps(
            model, [(p["prompt"], p["rejected"]) for p in pairs]
        )
        return Scores(chosen, rejected, chosen_tokens, rejected_tokens)

    def anchor_nll(self, model: Any, anchors: list[dict[str, Any]]) -> float:
        """Per-token negative log-likelihood of the anchor responses (their chosen side)."""
        logps, tokens = self._sequence_logps(model, [(a["prompt"], a["chosen"]) for a in anchors])
        return float(-logps.sum() / tokens.sum().clamp(min=1))

    def rewards(self, policy: Scores, ref: Scores) -> dict[str, float]:
        if self.loss_type == ["simpo"]:
            chosen = self.beta * policy.chosen / policy.chosen_tokens.clamp(min=1)
            rejected = self.beta * policy.rejected / policy.rejected_tokens.clamp(min=1)
        elif "sigmoid_norm" in self.loss_type:
            chosen = self.beta * (policy.chosen - ref.chosen) / policy.chosen_tokens.clamp(min=1)
            rejected = (
                self.beta * (policy.rejected - ref.rejected) / policy.rejected_tokens.clamp(min=1)
            )
        else:
            chosen = self.beta * (policy.chosen - ref.chosen)
            rejected = self.beta * (policy.rejected - ref.rejected)
        margins = chosen - rejected
        return {
            "accuracy": float((margins > 0).float().mean()),
            "margin": float(margins.mean()),
            "chosen": float(chosen.mean()),
            "rejected": float(rejected.mean()),
        }
