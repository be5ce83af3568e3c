"""The eval gate: score a trained adapter on held-out pairs; pass only if every criterion holds
with confidence. A LoRA adapter is first checked to be the one trained, complete and servable
(dpo_trainer.gate.adapter_checks): one that is not is rejected before it is scored.

Criteria (each reported with its estimate, interval, n, threshold and outcome in eval.json):
- rewardAccuracy >= minRewardAccuracy: share of held-out pairs the implicit reward ranks right
  (Wilson interval);
- rewardMargin >= minRewardMargin: mean implicit reward of chosen minus rejected (bootstrap);
- anchorNllIncrease <= maxAnchorNllIncrease: relative rise of the per-token NLL on an anchor set
  (default: the held-out chosen responses) over the starting model's; catches drift and reward
  hacking that training loss does not show (bootstrap over anchor texts);
- beatsPromoted (with mustBeatPromoted): held-out reward accuracy above the promoted adapter's
  by more than beatMargin, on the same pairs (paired bootstrap of the per-pair delta).
A criterion passes when its interval (gate.confidence) clears the threshold, fails when its
estimate does not, and is inconclusive in between: the verdict is then Inconclusive, nothing is
promoted, and the report says how many pairs would decide it (dpo_trainer.gate.confidence).
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

import numpy as np
import torch
from dpo_contract.config import GateConfig, TrainerConfig
from dpo_contract.fields import ModelRef
from dpo_contract.manifest import verify_manifest
from dpo_contract.pod import BadInputError
from dpo_contract.reports import (
    ArtifactCheck,
    GateCriterion,
    GateOutcome,
    GateReport,
    TrainingReport,
)
from numpy.typing import NDArray

from dpo_trainer.distributed import require_gpus
from dpo_trainer.gate.adapter_checks import changes_logits, check_saved_adapter
from dpo_trainer.gate.confidence import Estimate, Outcome, Relation, bootstrap, judge, mean, wilson
from dpo_trainer.io.artifacts import ADAPTER, EVAL_REPORT, TRAIN_REPORT, Artifacts
from dpo_trainer.io.data import load_preferences, load_split
from dpo_trainer.io.models import load_model, load_tokenizer, torch_dtype
from dpo_trainer.publish.targets import promoted_adapter

log = logging.getLogger(__name__)

BATCH_SIZE = 16
# Held-out prompts the adapter must change the logits of.
LOGIT_PROMPTS = 8


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
    estimate: Estimate | None  # None: nothing to measure (nothing promoted yet)
    relation: Relation
    threshold: float
    outcome: Outcome
    needed: int | None = None

    def reported(self) -> GateCriterion:
        measured = self.estimate
        return GateCriterion(
            name=self.name,
            value=measured.value if measured else None,
            low=measured.low if measured else None,
            high=measured.high if measured else None,
            n=measured.n if measured else None,
            method=measured.method if measured else None,
            threshold=self.threshold,
            passed=self.outcome == "pass",
            inconclusive=self.outcome == "inconclusive",
            needed_pairs=self.needed,
        )

    def describe(self) -> str:
        measured = self.estimate
        if measured is None:
            return f"{self.name} n/a (needs {self.relation} {self.threshold})"
        text = (
            f"{self.name} {measured.value:.4f} [{measured.low:.4f}, {measured.high:.4f}] on "
            f"{measured.n} (needs {self.relation} {self.threshold} at {measured.confidence:.0%})"
        )
        if self.needed is not None:
            text += f": about {self.needed} pairs would decide it"
        return text


def _check(
    name: str, estimate: Estimate, relation: Relation, threshold: float | None
) -> list[Criterion]:
    """The criterion, or none when its threshold is not set."""
    if threshold is None:
        return []
    outcome, needed = judge(estimate, relation, threshold)
    return [Criterion(name, estimate, relation, threshold, outcome, needed)]


def _verdict(criteria: list[Criterion]) -> tuple[GateOutcome, str | None]:
    failed = [c for c in criteria if c.outcome == "fail"]
    if failed:
        return "Rejected", "gate rejected: " + "; ".join(c.describe() for c in failed)
    unsure = [c for c in criteria if c.outcome == "inconclusive"]
    if unsure:
        return "Inconclusive", (
            "gate inconclusive (too few held-out pairs to be sure; nothing promoted): "
            + "; ".join(c.describe() for c in unsure)
            + "; give the gate more pairs (evalGate.data, evalGate.maxSamples) or lower "
            "evalGate.confidence"
        )
    return "Passed", None


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

    held_out = None
    if gate.hold_out is not None:
        _, pairs, report, held_out = load_split(
            gate.data, gate.hold_out, config.data.columns, config.data.format
        )
    else:
        pairs, report = load_preferences(gate.data, config.data.columns, config.data.format)
    pairs = pairs[: gate.max_samples] if gate.max_samples else pairs
    anchors = pairs
    if gate.anchor_data is not None:
        anchors, _ = load_preferences(gate.anchor_data, config.data.columns, config.data.format)
        anchors = anchors[: gate.max_samples] if gate.max_samples else anchors

    scorer = Scorer(config)
    checks = _artifact_checks(config, artifacts, adapter_dir, scorer, pairs)
    # What every verdict reports, whether the adapter was scored or refused before.
    judged: dict[str, Any] = {
        "adapter_digest": digest,
        "held_out": held_out,
        "pairs": len(pairs),
        "confidence": gate.confidence,
        "data": report,
        "artifact_checks": checks,
    }
    refused = [c for c in checks if not c.passed]
    if refused:
        result = GateReport(
            status="rejected",
            verdict="Rejected",
            criteria=[],
            message="gate rejected the adapter before scoring it: "
            + "; ".join(f"{c.name}: {c.detail}" for c in refused),
            metrics={},
            **judged,
        )
        artifacts.write_report(EVAL_REPORT, result)
        log.error("%s", result.message)
        return result
    # One model at a time: each is released before the next is loaded.
    new, new_anchor = scorer.scored(scorer.policy(adapter_dir), pairs, anchors)
    ref, ref_anchor = scorer.scored(scorer.reference(), pairs, anchors)

    chosen, rejected = scorer.rewards(new, ref)
    margins = chosen - rejected
    level = gate.confidence
    accuracy = wilson(int((margins > 0).sum()), len(margins), level)
    margin = bootstrap((margins,), mean, level)
    drift = bootstrap((*new_anchor, *ref_anchor), _nll_increase, level)
    criteria = [
        *_check("rewardAccuracy", accuracy, ">=", gate.min_reward_accuracy),
        *_check("rewardMargin", margin, ">=", gate.min_reward_margin),
        *_check("anchorNllIncrease", drift, "<=", gate.max_anchor_nll_increase),
    ]
    champion = None
    metrics: dict[str, float] = {}
    if gate.must_beat_promoted and config.promotion is not None:
        champion, beaten, metrics = _beats_promoted(
            config, gate, scorer, pairs, ref, margins, digest
        )
        criteria += beaten
    verdict, message = _verdict(criteria)
    result = GateReport(
        status=verdict.lower(),
        verdict=verdict,
        criteria=[c.reported() for c in criteria],
        message=message,
        metrics={
            "rewardAccuracy": accuracy.value,
            "rewardMargin": margin.value,
            "rewardChosen": float(chosen.mean()),
            "rewardRejected": float(rejected.mean()),
            "anchorNll": _nll(*new_anchor),
            "referenceAnchorNll": _nll(*ref_anchor),
            "anchorNllIncrease": drift.value,
            **metrics,
        },
        champion_digest=champion,
        pair_margins=[round(float(m), 6) for m in margins],
        **judged,
    )
    artifacts.write_report(EVAL_REPORT, result)
    for criterion in criteria:
        log.info("gate: %s -> %s", criterion.describe(), criterion.outcome)
    return result


def _nll(logps: NDArray[np.float64], tokens: NDArray[np.float64]) -> float:
    """Per-token negative log-likelihood over texts."""
    return float(-logps.sum() / max(tokens.sum(), 1))


def _nll_increase(
    new_logps: NDArray[np.float64],
    new_tokens: NDArray[np.float64],
    ref_logps: NDArray[np.float64],
    ref_tokens: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Relative rise of the per-token NLL over the reference's, per row of resampled texts."""
    new = -new_logps.sum(-1) / np.maximum(new_tokens.sum(-1), 1)
    ref = -ref_logps.sum(-1) / np.maximum(ref_tokens.sum(-1), 1)
    return (new - ref) / ref  # type: ignore[no-any-return]


def _beats_promoted(
    config: TrainerConfig,
    gate: GateConfig,
    scorer: Scorer,
    pairs: list[dict[str, Any]],
    ref: Scores,
    margins: NDArray[np.float64],
    digest: str,
) -> tuple[str, list[Criterion], dict[str, float]]:
    """The digest of the promoted adapter ("" when none), the beatsPromoted criterion, and the
    paired deltas as metrics."""
    assert config.promotion is not None
    current = promoted_adapter(config.promotion.target)
    if current is None:
        log.info("nothing promoted at %s yet: beatsPromoted passes", config.promotion.target)
        return "", [Criterion("beatsPromoted", None, ">", gate.beat_margin, "pass")], {}
    current_dir, current_digest = current
    if current_digest == digest:
        raise BadInputError(
            f"this adapter ({digest}) is already the promoted one at {config.promotion.target}"
        )
    with scorer.policy(current_dir) as promoted:
        champion_chosen, champion_rejected = scorer.rewards(scorer.score(promoted, pairs), ref)
    champion_margins = champion_chosen - champion_rejected
    correct = (margins > 0).astype(np.float64)
    champion_correct = (champion_margins > 0).astype(np.float64)
    accuracy = bootstrap(
        (correct - champion_correct,), mean, gate.confidence, method="paired-bootstrap"
    )
    margin = bootstrap(
        (margins - champion_margins,), mean, gate.confidence, method="paired-bootstrap"
    )
    metrics = {
        "beatsPromotedAccuracyDelta": accuracy.value,
        "beatsPromotedMarginDelta": margin.value,
        "beatsPromotedMarginDeltaLow": margin.low,
        "beatsPromotedMarginDeltaHigh": margin.high,
    }
    return current_digest, _check("beatsPromoted", accuracy, ">", gate.beat_margin), metrics


def _artifact_checks(
    config: TrainerConfig,
    artifacts: Artifacts,
    adapter_dir: Path,
    scorer: Scorer,
    pairs: list[dict[str, Any]],
) -> list[ArtifactCheck]:
    """A LoRA adapter's own checks (dpo_trainer.gate.adapter_checks); the logits are compared
    only for an adapter that loads."""
    if config.lora is None:
        return []
    trained = artifacts.read_report(TRAIN_REPORT, TrainingReport)
    checks = check_saved_adapter(
        adapter_dir, config, trained.trained_adapter if trained is not None else None
    )
    if all(c.passed for c in checks):
        sequences = [scorer.sequence(p["prompt"], p["chosen"]) for p in pairs[:LOGIT_PROMPTS]]
        with scorer.policy(adapter_dir) as model:
            checks.append(changes_logits(model, sequences, scorer.device))
    return checks


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
    ) -> tuple[Scores, tuple[NDArray[np.float64], NDArray[np.float64]]]:
        """The pairs' scores and the anchor texts' log-probs and token counts under `model`,
        which is released afterwards."""
        with model as loaded:
            return self.score(loaded, pairs), self.anchor_logps(loaded, anchors)

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

    def sequence(self, prompt: Any, completion: Any) -> list[int]:
        """The token ids of a prompt and its completion, as they are scored."""
        return self._tokenize(prompt, completion)[0]

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

    def anchor_logps(
        self, model: Any, anchors: list[dict[str, Any]]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Each anchor response's (its chosen side's) summed log-prob and token count."""
        logps, tokens = self._sequence_logps(model, [(a["prompt"], a["chosen"]) for a in anchors])
        return logps.double().numpy(), tokens.double().numpy()

    def rewards(
        self, policy: Scores, ref: Scores
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Each pair's implicit reward of the chosen and of the rejected response."""
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
        return chosen.double().numpy(), rejected.double().numpy()
