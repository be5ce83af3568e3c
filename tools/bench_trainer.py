"""Benchmark: step time and peak memory of the reference strategies (LoRA with the adapter
disabled, a full fine-tune holding two full copies, a full fine-tune with precomputed reference
log-probs), and our trainer's overhead against a bare TRL script doing the same work.

Usage:
    python tools/bench_trainer.py [--model builtin:llama-0.5b] [--steps 30] [--words 32]
    python tools/bench_trainer.py --reference-cache [--model ...]   (a beta sweep of two runs)

Each variant runs in a fresh process (peak memory is per process). Prints a table and ratios;
on a GPU (default model: the ~0.5B builtin:llama-0.5b, built locally) also tokens per second,
model FLOPs utilisation against the GPU's bf16 peak, and the memory plan's estimate next to the
measured peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = {
    "lora, reference = adapter disabled": {"peft": True, "reference": False, "precompute": False},
    "full, two full copies (policy + reference)": {
        "peft": False,
        "reference": True,
        "precompute": False,
    },
    "full, precomputed reference log-probs": {"peft": False, "reference": True, "precompute": True},
}
# FLOPs per parameter and token: forward and backward of the policy (6), plus the reference's
# forward (2) unless it was precomputed.
FLOPS_PER_PARAMETER_TOKEN = {
    "lora, reference = adapter disabled": 8,
    "full, two full copies (policy + reference)": 8,
    "full, precomputed reference log-probs": 6,
}
BARE_TRL = "bare TRL script (adapter disabled)"
# Dense bf16 peak of the GPUs this project is benchmarked on, in FLOP/s.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def job_manifest(
    model: str, steps: int, words: int, variant: dict[str, bool], on_gpu: bool
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": model},
        "data": {"train": {"uri": f"builtin:synthetic-preferences/train?n=2048&words={words}"}},
        "dpo": {
            "learningRate": 1e-4,
            "maxSteps": steps,
            "perDeviceBatchSize": 8,
            "maxLength": 4 * words + 16,
            "loggingSteps": steps,
            "saveSteps": 10 * steps,
            "precomputeRefLogProbs": variant["precompute"],
        },
        "peft": {"enabled": variant["peft"], "r": 16, "alpha": 32, "dropout": 0.0},
        "resources": {"nodes": 1, "gpusPerNode": 1 if on_gpu else 0},
        "parallelism": {"activationCheckpointing": False},
        "evalGate": {"enabled": False},
        "output": {"uri": "pvc://bench"},
    }
    if variant["reference"]:
        spec["model"]["reference"] = {"name": model}
    return {
        "apiVersion": "dpo.dev/v1alpha1",
        "kind": "DPOJob",
        "metadata": {"name": "bench"},
        "spec": spec,
    }


def measure(
    trainer_state_history: list[dict[str, Any]], steps: int, started: float
) -> dict[str, Any]:
    import torch

    runtime = next(e["train_runtime"] for e in trainer_state_history if "train_runtime" in e)
    tokens = max((e.get("num_tokens", 0) for e in trainer_state_history), default=0)
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "step_seconds": runtime / steps,
        "peak_bytes": peak,
        "tokens": tokens,
        "runtime": runtime,
        "wall": time.monotonic() - started,
    }


def run_ours(args: argparse.Namespace, variant: dict[str, bool], workdir: Path) -> dict[str, Any]:
    import torch
    from dpo_operator.core.render import trainer_config
    from dpo_operator.core.resolve import resolve
    from dpo_operator.core.validate import parse_dpojob
    from dpo_operator.local.kubelet import free_port
    from dpo_trainer.train.run import train

    started = time.monotonic()
    job = parse_dpojob(
        job_manifest(args.model, args.steps, args.words, variant, torch.cuda.is_available())
    )
    # No reference cache: each run scores its reference, as the variants compare.
    config = trainer_config(resolve(job)).model_copy(
        update={"artifacts_dir": str(workdir), "reference_cache": None, "metrics_port": free_port()}
    )
    summary = train(config)
    result = measure(summary.log_history, args.steps, started)
    result["planned_bytes"] = planned_bytes(job, on_gpu=torch.cuda.is_available())
    return result


def reference_cache_sweep(args: argparse.Namespace) -> None:
    """Two runs of a beta sweep sharing one reference cache: the first computes the reference
    log-probs, the second reuses them. Prints the time the second saved."""
    import torch
    from dpo_operator.core.render import trainer_config
    from dpo_operator.core.resolve import resolve
    from dpo_operator.core.validate import parse_dpojob
    from dpo_operator.local.kubelet import free_port
    from dpo_trainer.train.run import train

    workdir = Path(tempfile.mkdtemp(prefix="dpo-bench-cache-"))
    variant = VARIANTS["full, precomputed reference log-probs"]
    runs = []
    for beta in (0.1, 0.5):
        on_gpu = torch.cuda.is_available()
        manifest = job_manifest(args.model, args.steps, args.words, variant, on_gpu)
        manifest["spec"]["dpo"]["beta"] = beta
        config = trainer_config(resolve(parse_dpojob(manifest))).model_copy(
            update={
                "artifacts_dir": str(workdir / f"beta-{beta}"),
                "reference_cache": str(workdir / "reference-logps"),
                "metrics_port": free_port(),
            }
        )
        started = time.monotonic()
        report = train(config)
        runs.append((beta, time.monotonic() - started, report.reference_log_probs))
    print(f"\nmodel {args.model}, {args.steps} steps, {args.words} words per response")
    for beta, seconds, precomputed in runs:
        for entry in precomputed:
            how = "reused" if entry.reused else "computed"
            print(
                f"beta {beta}: reference log-probs of {entry.pairs} {entry.split} pairs {how} in "
                f"{entry.seconds:.2f}s (key {(entry.key or '')[:12]}); whole run {seconds:.1f}s"
            )
    first = sum(e.seconds for e in runs[0][2])
    second = sum(e.seconds for e in runs[1][2])
    print(
        f"reference cache: the second run saved {first - second:.1f}s of {first:.1f}s "
        f"({(first - second) / first:.0%}); run {runs[0][1]:.1f}s -> {runs[1][1]:.1f}s"
    )


def planned_bytes(job: Any, on_gpu: bool) -> int:
    """The memory plan's estimate for this one-process run (bf16 on a GPU, fp32 on CPU)."""
    from dpo_operator.core.plan import Layout, estimate, model_shape

    shape = model_shape(job.spec)
    assert shape is not None, "builtin models have known sizes"
    return estimate(
        job.spec, shape, Layout("single", 1), 0, device="cuda" if on_gpu else "cpu"
    ).total


def run_bare_trl(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The same work written directly against TRL, as a user script would."""
    import torch
    from datasets import Dataset
    from dpo_trainer.io.builtin import builtin_model_path, synthetic_preferences
    from dpo_trainer.io.models import cache_dir
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    started = time.monotonic()
    path = builtin_model_path(args.model, cache_dir() / "models")
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows = synthetic_preferences(f"synthetic-preferences/train?n=2048&words={args.words}")
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
        args=DPOConfig(
            output_dir=str(workdir),
            learning_rate=1e-4,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            max_length=4 * args.words + 16,
            logging_steps=args.steps,
            save_strategy="no",
            report_to="none",
            gradient_checkpointing=False,
            bf16=on_gpu,
            use_cpu=not on_gpu,
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(
            task_type="CAUSAL_LM",
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
        ),
    )
    trainer.train()
    result = measure(trainer.state.log_history, args.steps, started)
    result["parameters"] = sum(p.numel() for p in trainer.model.parameters())
    return result


def child(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    if args.run == BARE_TRL:
        result = run_bare_trl(args, workdir)
    else:
        result = run_ours(args, VARIANTS[args.run], workdir)
    print("RESULT " + json.dumps(result), flush=True)


def gpu_report(results: dict[str, dict[str, Any]]) -> None:
    import torch

    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), None)
    parameters = results[BARE_TRL].get("parameters", 0)
    print(f"\n{'variant':44s} {'tokens/s':>10s} {'MFU':>7s} {'planned GiB':>12s} {'peak GiB':>9s}")
    for label, result in results.items():
        tokens_per_second = result["tokens"] / result["runtime"]
        # With LoRA the frozen base still runs the full forward and backward.
        flops = FLOPS_PER_PARAMETER_TOKEN.get(label, 8) * parameters * tokens_per_second
        mfu = f"{flops / peak:.1%}" if peak else "n/a"
        planned = result.get("planned_bytes")
        planned_text = f"{planned / 2**30:12.2f}" if planned else f"{'-':>12s}"
        print(
            f"{label:44s} {tokens_per_second:10.0f} {mfu:>7s} {planned_text} "
            f"{result['peak_bytes'] / 2**30:9.2f}"
        )
    print(f"(MFU against the bf16 dense peak of {name})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="default: builtin:llama-0.5b on a GPU, builtin:small-llama on CPU"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--words", type=int, default=32, help="words per response")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument(
        "--reference-cache",
        action="store_true",
        help="time a beta sweep of two runs that share the reference log-prob cache",
    )
    args = parser.parse_args()
    if args.model is None:
        import torch

        args.model = "builtin:llama-0.5b" if torch.cuda.is_available() else "builtin:small-llama"
    if args.run:
        child(args)
        return
    if args.reference_cache:
        reference_cache_sweep(args)
        return

    results: dict[str, dict[str, Any]] = {}
    for label in [*VARIANTS, BARE_TRL]:
        command = [
            sys.executable,
            __file__,
            "--run",
            label,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--words",
            str(args.words),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((x for x in output.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{label} failed:\n{output.stdout[-2000:]}\n{output.stderr[-4000:]}")
        results[label] = json.loads(line.removeprefix("RESULT "))

    base = results["lora, reference = adapter disabled"]
    print(f"\nmodel {args.model}, {args.steps} steps, batch 8, {args.words} words per response\n")
    print(f"{'variant':44s} {'step s':>8s} {'peak MiB':>9s} {'step ratio':>11s} {'mem ratio':>10s}")
    for label, result in results.items():
        print(
            f"{label:44s} {result['step_seconds']:8.3f} {result['peak_bytes'] / 2**20:9.0f} "
            f"{result['step_seconds'] / base['step_seconds']:11.2f} "
            f"{result['peak_bytes'] / base['peak_bytes']:10.2f}"
        )
    bare = results[BARE_TRL]
    step_ratio = base["step_seconds"] / bare["step_seconds"]
    memory_ratio = base["peak_bytes"] / bare["peak_bytes"]
    print(f"\nour trainer / bare TRL: step time x{step_ratio:.2f}, peak memory x{memory_ratio:.2f}")
    import torch

    if torch.cuda.is_available():
        gpu_report(results)


if __name__ == "__main__":
    main()
