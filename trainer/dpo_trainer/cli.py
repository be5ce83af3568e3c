"""`dpo-trainer`: the commands training, eval and promote pods run.

Usage:
    dpo-trainer init --config /etc/dpo/trainer.json      (the model initializer, on a CPU)
    dpo-trainer train --config /etc/dpo/trainer.json     (under `accelerate launch`)
    dpo-trainer eval --config /etc/dpo/trainer.json      (the gate)
    dpo-trainer promote --config /etc/dpo/trainer.json   (after the gate passed)
    dpo-trainer launch -- accelerate launch ...          (PID 1: forwards SIGTERM)
    torchrun --nproc-per-node N -m dpo_trainer.cli preflight [--max-mib 256]
                                                         (the fabric's bandwidth sweep alone)

Exit codes (the pod contract): 0 done, 2 bad config or data (never retried), 3 gate rejected,
4 the pod's devices or distributed setup are not what was rendered (never retried), 5 the
promoted adapter changed after the gate beat it (promote; never retried), 143 stopped by
SIGTERM, anything else an infrastructure failure that may be retried from a checkpoint. Each
command writes a short JSON summary to the termination log.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from types import FrameType

from dpo_contract.config import load_trainer_config
from dpo_contract.pod import (
    ENV_TERMINATION_LOG,
    EXIT_BAD_INPUT,
    EXIT_CHAMPION_CHANGED,
    EXIT_GATE_REJECTED,
    EXIT_OK,
    EXIT_WRONG_ENVIRONMENT,
    TERMINATION_LOG,
    TRAINER_CONFIG_PATH,
    BadInputError,
    ChampionChangedError,
    WrongEnvironmentError,
)
from dpo_contract.reports import Failure, FailureStatus
from dpo_contract.termination import TerminationMessage, termination_message_json

from dpo_trainer.launch import main as launch
from dpo_trainer.launch import record_exit, register_trainer

log = logging.getLogger("dpo_trainer")

# What an unexpected exception exits with: retryable, like any infrastructure failure.
EXIT_INFRASTRUCTURE = 1
EXIT_STOPPED = 128 + signal.SIGTERM


class StoppedError(Exception):
    """SIGTERM reached eval or promote (the pod is being deleted, preempted or evicted)."""


# How a command that stops short says so: the termination message's status, the exit code and
# the log level.
# A SIGTERM leaves nothing half-done (promotion stages its copy and switches `current` in one
# step; the gate writes eval.json last), so a retry starts over.
_STOPPED_SHORT: dict[type[Exception], tuple[FailureStatus, int, int]] = {
    StoppedError: ("interrupted", EXIT_STOPPED, logging.WARNING),
    ChampionChangedError: ("champion-changed", EXIT_CHAMPION_CHANGED, logging.ERROR),
    BadInputError: ("bad-input", EXIT_BAD_INPUT, logging.ERROR),
    WrongEnvironmentError: ("wrong-environment", EXIT_WRONG_ENVIRONMENT, logging.ERROR),
}


def _stop(signum: int, frame: FrameType | None) -> None:
    # A container's PID 1 has no default SIGTERM action: without a handler the signal is
    # ignored and the kubelet waits out the grace period before it kills.
    raise StoppedError(f"stopped by signal {signal.Signals(signum).name}")


SUMMARY_METRICS = (
    "dpo_train_loss",
    "dpo_train_reward_accuracy",
    "dpo_train_reward_margin",
    "dpo_eval_reward_accuracy",
    "dpo_eval_reward_margin",
)


def write_termination_message(message: TerminationMessage) -> None:
    """The small JSON the operator reads from the pod status (never the logs)."""
    path = os.environ.get(ENV_TERMINATION_LOG, TERMINATION_LOG)
    text = termination_message_json(message)
    try:
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(text)
    except OSError as error:
        log.debug("no termination log at %s: %s", path, error)


def _init(args: argparse.Namespace) -> int:
    from dpo_trainer.io.initialize import initialize

    write_termination_message(initialize(load_trainer_config(args.config)))
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from dpo_trainer.train.run import EXIT_INTERRUPTED, TrainingInterruptedError, train

    config = load_trainer_config(args.config)
    try:
        report = train(config)
    except TrainingInterruptedError as stop:
        write_termination_message(Failure(status="interrupted", message=str(stop)))
        log.warning("%s; a restart resumes from the checkpoint", stop)
        return EXIT_INTERRUPTED
    # The processes of a pod share its termination log: the pod's first one reports.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        write_termination_message(report.summary(SUMMARY_METRICS))
    return EXIT_OK


def _eval(args: argparse.Namespace) -> int:
    from dpo_trainer.gate.evaluate import evaluate

    report = evaluate(load_trainer_config(args.config))
    write_termination_message(report.short())
    if report.message:
        log.error("%s", report.message)
    return EXIT_OK if report.verdict == "Passed" else EXIT_GATE_REJECTED


def _promote(args: argparse.Namespace) -> int:
    from dpo_trainer.publish.promote import promote

    write_termination_message(promote(load_trainer_config(args.config)))
    return EXIT_OK


def _choose(args: argparse.Namespace) -> int:
    from dpo_trainer.gate.choose import GatedTrial, choose

    choice = choose([GatedTrial.parse(text) for text in args.trial])
    write_termination_message(choice)
    log.info("trial %d won (%d compared)", choice.winner, len(choice.compared))
    return EXIT_OK


def _preflight(args: argparse.Namespace) -> int:
    from dpo_trainer.train.fabric import standalone_preflight

    return standalone_preflight(args.max_mib)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-trainer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, run, text in (
        ("init", _init, "resolve, count and stage the model of trainer.json (before training)"),
        ("train", _train, "train on the preference pairs of trainer.json"),
        ("eval", _eval, "run the held-out gate on the trained adapter (exit 3 if rejected)"),
        ("promote", _promote, "publish the gated adapter to the promotion target"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", default=TRAINER_CONFIG_PATH, help="path of trainer.json")
        command.set_defaults(run=run)
    chooser = commands.add_parser(
        "choose", help="a DPOSweep's winner: its gated trials' held-out margins, pair by pair"
    )
    chooser.add_argument(
        "--trial",
        action="append",
        required=True,
        help="N=ARTIFACTS_DIR@BETA, once for each trial whose gate passed",
    )
    chooser.set_defaults(run=_choose)
    preflight = commands.add_parser(
        "preflight", help="the fabric's bandwidth sweep alone, under torchrun (no config)"
    )
    preflight.add_argument("--max-mib", type=int, default=256, help="the largest message (MiB)")
    preflight.set_defaults(run=_preflight)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Deprecations inside transformers/TRL are theirs to fix; users cannot act on them.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl)\.")
    if argv[:1] == ["launch"]:
        return launch(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    args = build_parser().parse_args(argv)
    register_trainer(os.getpid())
    if args.command in ("init", "eval", "promote"):  # training stops at a checkpoint instead
        signal.signal(signal.SIGTERM, _stop)
    code = EXIT_INFRASTRUCTURE
    try:
        code = args.run(args)
    except tuple(_STOPPED_SHORT) as error:
        status, code, level = next(v for k, v in _STOPPED_SHORT.items() if isinstance(error, k))
        log.log(level, "%s", error)
        write_termination_message(
            Failure(status=status, message=str(error), reason=getattr(error, "reason", None))
        )
    finally:
        record_exit(os.getpid(), code)
    if args.command == "train":
        _exit_without_teardown(code)
    return code


def _exit_without_teardown(code: int) -> None:
    """End a trainer whose results are written without finalizing the interpreter.

    Device meshes keep their gloo groups alive past `destroy_process_group`; when the interpreter
    is torn down under gloo's worker threads, a rank of a finished run can abort (exit -6) and
    turn a success into a failed pod.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
