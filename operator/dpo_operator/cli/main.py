"""`dpo`: validate and render DPOJob manifests, print the CRD.

Usage:
    dpo validate FILE...          exit 0, or 1 with one line per problem
    dpo render FILE [--attempt N] the child objects as YAML, like `helm template`
    dpo plan FILE                 per-GPU memory by part, the strategy chosen and why (a hub
                                  model's config.json from the hub unless --offline)
    dpo run FILE                  train, gate and promote on this machine (a DPOSweep: every
                                  trial, then the winner promoted)
    dpo compare RUN...            runs side by side, and one PNG of their curves
    dpo pull oci://REF DIR        fetch a promoted adapter, verified, with its gate's verdict
    dpo operator -A | -n NS       run the operator
    dpo crd [DPOSweep]            the DPOJob (or DPOSweep) CustomResourceDefinition as YAML
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dpo_operator.api import KIND, DPOJob, OutputSpec, describe_errors
from dpo_operator.api.crd import crd_manifest
from dpo_operator.api.sweep import SWEEP_KIND
from dpo_operator.cli.hub import HubRefusedError, HubUnreachableError, hub_config
from dpo_operator.cli.report import summarize
from dpo_operator.core.network import DEFAULT_ALLOWED_PROFILES, DEFAULT_TCPXO_DAEMON_IMAGE
from dpo_operator.core.plan import ModelShape, format_plan, plan, shape_of
from dpo_operator.core.policy import refusals
from dpo_operator.core.render import render_all, to_yaml
from dpo_operator.core.resolve import resolve
from dpo_operator.core.settings import DEFAULT_TRAINER_IMAGE, Settings
from dpo_operator.core.storage import model_is_on_hub
from dpo_operator.core.sweep import SweepError, Trial, trials
from dpo_operator.core.validate import parse_dpojob
from dpo_operator.local.executor import LocalOptions
from dpo_operator.local.executor import run as run_locally
from dpo_operator.local.sweep import run_sweep


class ManifestError(Exception):
    """A manifest file that cannot be read as DPOJobs; the message names file and problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_documents(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The YAML documents of a file, each with the label its problems are reported under;
    raises ManifestError for a file that is missing or not YAML, or a document of another kind."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except FileNotFoundError:
        raise ManifestError([f"{path}: no such file"]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestError([f"{path}:{where}: not valid YAML: {problem}"]) from None
    labelled: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    for index, document in enumerate(documents):
        label = f"{path}" if len(documents) == 1 else f"{path} (document {index + 1})"
        kind = document.get("kind") if isinstance(document, dict) else type(document).__name__
        if not isinstance(document, dict) or kind not in (KIND, SWEEP_KIND):
            problems.append(f"{label}: kind: expected {KIND} or {SWEEP_KIND}, got {kind!r}")
            continue
        labelled.append((label, document))
    if problems:
        raise ManifestError(problems)
    if not labelled:
        raise ManifestError([f"{path}: no DPOJob in this file"])
    return labelled


def load_dpojobs(
    path: Path, *, check_memory: bool = True, default_output: OutputSpec | None = None
) -> list[DPOJob]:
    """Every DPOJob of a YAML file, a DPOSweep's trials among them (`load_trials`); raises
    ManifestError naming each problem. `default_output` goes to those that name no spec.output."""
    documents = load_documents(path)
    held = load_trials(documents, check_memory=check_memory, default_output=default_output)
    return [job_of(item) for item in held]


def job_of(item: DPOJob | Trial) -> DPOJob:
    return item.job if isinstance(item, Trial) else item


def load_trials(
    documents: list[tuple[str, dict[str, Any]]],
    *,
    check_memory: bool = True,
    default_output: OutputSpec | None = None,
) -> list[DPOJob | Trial]:
    """What the documents of a YAML file (`load_documents`) hold, in order: DPOJobs, and
    DPOSweeps' trials; raises ManifestError naming each problem of every document."""
    loaded: list[DPOJob | Trial] = []
    problems: list[str] = []
    for label, document in documents:
        try:
            if document["kind"] == SWEEP_KIND:
                swept = trials(document, default_output, check_memory=check_memory)
                loaded += swept
            else:
                job = parse_dpojob(
                    document, check_memory=check_memory, default_output=default_output
                )
                loaded.append(job)
        except ValidationError as error:
            problems += [f"{label}: {line}" for line in describe_errors(error)]
        except SweepError as error:
            problems += [f"{label}: {line}" for line in error.problems]
    if problems:
        raise ManifestError(problems)
    return loaded


def _validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            jobs = load_dpojobs(path, default_output=default_output(args))
        except ManifestError as error:
            print("\n".join(error.problems), file=sys.stderr)
            failed = True
            continue
        for job in jobs:
            print(f"{path}: DPOJob {job.namespace}/{job.name} is valid")
    return 1 if failed else 0


def _render(args: argparse.Namespace) -> int:
    try:
        loaded = load_trials(load_documents(args.file), default_output=default_output(args))
    except ManifestError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 1
    settings = settings_from_args(args)
    jobs = [job_of(item) for item in loaded]
    refused = [f"{job.name}: {line}" for job in jobs for line in refusals(job, settings)]
    if refused:
        print("\n".join(refused), file=sys.stderr)
        return 1
    objects: list[dict[str, Any]] = []
    for item in loaded:
        # What the operator creates: a sweep, its trials' DPOJobs; a DPOJob, its children.
        if isinstance(item, Trial):
            objects.append(item.manifest)
        else:
            objects += render_all(resolve(item, settings), args.attempt)
    sys.stdout.write(to_yaml(objects))
    return 0


def _plan(args: argparse.Namespace) -> int:
    try:
        jobs = load_dpojobs(args.file, check_memory=False, default_output=default_output(args))
    except ManifestError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 1
    fits = True
    for job in jobs:
        model = job.spec.model
        try:
            config = model_config(model.name, args.model_config)
            shape = None
            if config is None and model_is_on_hub(model.name) and not args.offline:
                shape = _hub_shape(model.name, model.revision)
            result = plan(job.spec, config, shape)
        except HubRefusedError as error:
            print(f"spec.model.name: {error}", file=sys.stderr)
            return 1
        except (OSError, ValueError, KeyError) as error:
            where = args.model_config or f"{model.name}/config.json"
            print(f"{where}: cannot count the model's parameters: {error}", file=sys.stderr)
            return 1
        print(f"DPOJob {job.namespace}/{job.name}")
        print(format_plan(job.spec, result))
        print()
        fits = fits and not result.problems
    return 0 if fits else 1


def _hub_shape(repo: str, revision: str | None) -> ModelShape | None:
    """The shape of a hub model's config.json, as the model initializer will count it; None,
    with a warning, when the hub cannot be reached (the plan falls back on what it knows)."""
    try:
        config = hub_config(repo, revision)
    except HubUnreachableError as error:
        print(
            f"{repo}: {error}; planned without its config.json (--offline: never ask the hub)",
            file=sys.stderr,
        )
        return None
    return shape_of(config, f"config.json of {repo}@{revision or 'main'} from the hub")


def model_config(model: str, given: Path | None) -> dict[str, Any] | None:
    """The model's config.json: the one given, or the one in the model's own directory when
    spec.model.name is a local path; None otherwise (a known model, or the spec's count)."""
    path = given or Path(model) / "config.json"
    if given is None and not path.is_file():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


# `dpo run`'s output for a DPOJob that names none: a claim its work directory holds.
LOCAL_OUTPUT = OutputSpec(uri="pvc://dpo-runs")


def _run(args: argparse.Namespace) -> int:
    try:
        documents = load_documents(args.file)
        loaded = load_trials(documents, default_output=LOCAL_OUTPUT)
    except ManifestError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 1
    if len(documents) != 1:
        print(
            f"{args.file}: holds {len(documents)} documents; `dpo run` takes one DPOJob or one "
            "DPOSweep",
            file=sys.stderr,
        )
        return 1
    volumes: dict[str, Path] = {}
    for mapping in args.volume:
        claim, separator, path = mapping.partition("=")
        if not separator or not claim or not path:
            print(f"--volume {mapping!r}: write CLAIM=PATH, e.g. datasets=./data", file=sys.stderr)
            return 1
        volumes[claim] = Path(path)
    ((_, document),) = documents
    workdir = args.workdir or Path("dpo-runs") / document["metadata"]["name"]
    found = [item for item in loaded if isinstance(item, Trial)]
    if found:
        options = LocalOptions(workdir=workdir, volumes=volumes, cpu=args.cpu)
        return run_sweep(document, found, options, sys.stdout)
    (job,) = [item for item in loaded if not isinstance(item, Trial)]
    options = LocalOptions(
        workdir=workdir,
        volumes=volumes,
        metrics_port=args.metrics_port,
        approve=args.approve,
        cpu=args.cpu,
    )
    confirm = _ask if sys.stdin.isatty() else None
    return run_locally(job, options, confirm=confirm, summarize=summarize)


def _ask(question: str) -> bool:
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _operator(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    # Importing a controller registers its handlers with kopf.
    from dpo_operator.controller import dpojob, dposweep, wiring

    if not args.all_namespaces and not args.namespace:
        print("dpo operator: pass --namespace NS (repeatable) or --all-namespaces", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.verbose:  # kopf logs every handler call at INFO: one line per watch event
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    start_http_server(args.metrics_port)
    del dpojob, dposweep, wiring
    kopf.run(
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz",
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        memo=kopf.Memo(render_settings=settings_from_args(args)),
    )
    return 0


def settings_from_args(args: argparse.Namespace) -> Settings:
    """What `dpo operator` adds to every DPOJob it renders and allows it; `dpo render` takes
    the same flags."""
    profiles: dict[str, frozenset[str]] = {"*": frozenset(DEFAULT_ALLOWED_PROFILES)}
    for namespace, listed in _pairs(args.allow_profiles, "--allow-profiles"):
        profiles[namespace] = frozenset(p for p in listed.split(",") if p)
    classes: dict[str, frozenset[str]] = {}
    for namespace, listed in _pairs(args.allow_priority_classes, "--allow-priority-classes"):
        classes[namespace] = classes.get(namespace, frozenset()) | {
            c for c in listed.split(",") if c
        }
    roots: dict[str, tuple[str, ...]] = {}
    for namespace, root in _pairs(args.promotion_root, "--promotion-root"):
        roots[namespace] = (*roots.get(namespace, ()), root)
    return Settings(
        trainer_image=args.trainer_image,
        tcpxo_daemon_image=args.tcpxo_daemon_image,
        allowed_profiles=profiles,
        promotion_roots=roots,
        allowed_priority_classes=classes,
        network_policy=not args.no_network_policy,
        operator_namespace=args.operator_namespace,
        metrics_scrapers=tuple(args.metrics_scraper),
        default_output=default_output(args),
    )


def default_output(args: argparse.Namespace) -> OutputSpec | None:
    """--default-output (and its Secret), for the DPOJobs that name no spec.output."""
    if not args.default_output:
        return None
    try:
        return OutputSpec(uri=args.default_output, credentials_secret=args.default_output_secret)
    except ValidationError as error:
        problems = "; ".join(describe_errors(error))
        raise SystemExit(f"dpo: --default-output {args.default_output!r}: {problems}") from None


def _add_default_output(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--default-output",
        metavar="URI",
        help="where the artifacts of DPOJobs that name no spec.output go (pvc://<claim>/<path> "
        "or an object store URI); none given: each DPOJob must name one",
    )
    command.add_argument(
        "--default-output-secret",
        metavar="SECRET",
        help="the Secret (in each DPOJob's namespace) with the default output's credentials",
    )


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        namespace, separator, rest = value.partition("=")
        if not separator or not namespace:
            raise SystemExit(f"dpo: {flag} {value!r}: write NAMESPACE=VALUE (NAMESPACE may be *)")
        pairs.append((namespace, rest))
    return pairs


def _add_settings(command: argparse.ArgumentParser) -> None:
    _add_default_output(command)
    command.add_argument(
        "--trainer-image",
        default=DEFAULT_TRAINER_IMAGE,
        help="trainer image of DPOJobs that set no spec.image (default: %(default)s)",
    )
    command.add_argument(
        "--tcpxo-daemon-image",
        default=DEFAULT_TCPXO_DAEMON_IMAGE,
        help="image of the TCPXO receive-datapath daemon (NET_ADMIN, host /sys): pin it "
        "(default: %(default)s)",
    )
    command.add_argument(
        "--allow-profiles",
        action="append",
        default=[],
        metavar="NAMESPACE=P1,P2",
        help="network profiles DPOJobs in NAMESPACE (* for every one) may use, on top of those "
        "of *; repeatable (default: *=" + ",".join(DEFAULT_ALLOWED_PROFILES) + "; tcpxo needs "
        "host access and is allowed only where listed)",
    )
    command.add_argument(
        "--allow-priority-classes",
        action="append",
        default=[],
        metavar="NAMESPACE=C1,C2",
        help="PriorityClasses DPOJobs in NAMESPACE (* for every one) may use, on top of those of "
        "*; repeatable (default: any but system-*, which is never allowed)",
    )
    command.add_argument(
        "--no-network-policy",
        action="store_true",
        help="create no NetworkPolicy fencing the trainers' pods in each namespace",
    )
    command.add_argument(
        "--operator-namespace",
        default=os.environ.get("POD_NAMESPACE", "dpo-system"),
        help="the operator's namespace, which may scrape the trainers' metrics "
        "(default: $POD_NAMESPACE or %(default)s)",
    )
    command.add_argument(
        "--metrics-scraper",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="a namespace whose pods (Prometheus) may scrape the trainers' metrics; repeatable",
    )
    command.add_argument(
        "--promotion-root",
        action="append",
        default=[],
        metavar="NAMESPACE=URI",
        help="promotion targets of NAMESPACE (* for every one) must lie under URI ({namespace} "
        "is replaced); repeatable; none given: any target",
    )


def _compare(args: argparse.Namespace) -> int:
    from dpo_operator.cli.compare import RunNotFoundError, compare

    try:
        text, plot = compare(args.runs, args.plot)
    except RunNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    print(text)
    print(f"curves: {plot}" if plot else "curves: none to plot (no train.json, or no matplotlib)")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from dpo_contract.pod import BadInputError
    from dpo_trainer.publish.oci import pull_adapter
    from dpo_trainer.publish.registry import RegistryUnavailableError

    try:
        pulled = pull_adapter(args.reference, args.directory, plain_http=args.plain_http)
    except (BadInputError, RegistryUnavailableError) as error:
        print(f"dpo pull: {error}", file=sys.stderr)
        return 1
    criteria = ", ".join(
        f"{c.name} {c.value:.4g}" if c.value is not None else c.name for c in pulled.gate.criteria
    )
    print(f"pulled {pulled.reference} ({pulled.version}) to {pulled.directory}")
    print(f"adapter {pulled.adapter_digest}, every file verified; base model {pulled.base_model}")
    print(f"gate {pulled.gate.verdict} on {pulled.gate.pairs} pairs: {criteria}")
    return 0


def _crd(args: argparse.Namespace) -> int:
    sys.stdout.write(
        "# Generated by `dpo crd` from dpo_operator.api: do not edit by hand.\n"
        + yaml.safe_dump(crd_manifest(args.kind), sort_keys=False, width=100)
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo", description="DPO fine-tuning on Kubernetes: validate, render, CRD."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check DPOJob manifests")
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _add_default_output(validate)
    validate.set_defaults(run=_validate)

    render = commands.add_parser("render", help="print the objects a DPOJob creates")
    render.add_argument("file", type=Path, metavar="FILE")
    render.add_argument(
        "--attempt", type=int, default=1, help="training attempt to render (default 1)"
    )
    _add_settings(render)
    render.set_defaults(run=_render)

    plan_command = commands.add_parser(
        "plan", help="print the per-GPU memory plan and the chosen strategy"
    )
    plan_command.add_argument("file", type=Path, metavar="FILE")
    plan_command.add_argument(
        "--model-config",
        type=Path,
        metavar="CONFIG_JSON",
        help="the model's config.json, for its exact size (default: the model's directory's, "
        "when spec.model.name is a local path)",
    )
    plan_command.add_argument(
        "--offline",
        action="store_true",
        help="never fetch a hub model's config.json (HF_ENDPOINT and HF_TOKEN are honoured); "
        "plan from the known models or spec.model.parameters",
    )
    _add_default_output(plan_command)
    plan_command.set_defaults(run=_plan)

    run = commands.add_parser("run", help="train, gate and promote a DPOJob on this machine")
    run.add_argument("file", type=Path, metavar="FILE")
    run.add_argument("--workdir", type=Path, help="run directory (default: ./dpo-runs/<name>)")
    run.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="CLAIM=PATH",
        help="use a local directory for a PersistentVolumeClaim (default: <workdir>/volumes/CLAIM)",
    )
    run.add_argument(
        "--metrics-port", type=int, help="serve /metrics here (default: a free port, printed)"
    )
    run.add_argument("--approve", action="store_true", help="approve a manual promotion")
    run.add_argument(
        "--cpu", action="store_true", help="train on the CPU even if the job asks for GPUs"
    )
    run.set_defaults(run=_run)

    compare_command = commands.add_parser(
        "compare", help="runs side by side (a sweep), and one PNG of their curves"
    )
    compare_command.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a `dpo run` directory, a run's artifacts (directory or URI), or "
        "dpojob/[NAMESPACE/]NAME",
    )
    compare_command.add_argument(
        "--plot", type=Path, default=Path("compare.png"), help="the PNG (default %(default)s)"
    )
    compare_command.set_defaults(run=_compare)

    pull = commands.add_parser(
        "pull", help="fetch a promoted adapter from an OCI registry, verified, into DIR"
    )
    pull.add_argument(
        "reference",
        metavar="oci://REGISTRY/REPOSITORY[:TAG|@DIGEST]",
        help="the adapter (no tag: current, the newest promoted); credentials from "
        "OCI_USERNAME and OCI_PASSWORD",
    )
    pull.add_argument("directory", type=Path, metavar="DIR", help="a new or empty directory")
    pull.add_argument(
        "--plain-http", action="store_true", help="HTTP instead of HTTPS (a registry without TLS)"
    )
    pull.set_defaults(run=_pull)

    operator = commands.add_parser("operator", help="run the operator (kopf) against a cluster")
    scope = operator.add_mutually_exclusive_group()
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)"
    )
    operator.add_argument("--metrics-port", type=int, default=8080, help="operator /metrics port")
    operator.add_argument("--liveness-port", type=int, default=8081, help="kopf /healthz port")
    operator.add_argument(
        "--peering",
        help="kopf peering name, for several replicas with distinct --priority (needs kopf's "
        "peering CRDs); without it the operator runs standalone: deploy one replica",
    )
    operator.add_argument("--priority", type=int, default=0, help="peering priority")
    operator.add_argument("--verbose", action="store_true")
    _add_settings(operator)
    operator.set_defaults(run=_operator)

    crd = commands.add_parser("crd", help="print a CustomResourceDefinition (DPOJob, DPOSweep)")
    crd.add_argument("kind", nargs="?", default=KIND, choices=[KIND, SWEEP_KIND])
    crd.set_defaults(run=_crd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
