"""The fabric under a run, measured before training and watched while it trains.

- What NCCL really did: the first process of each pod logs NCCL's INIT and NET subsystems at
  INFO into a file (the others stay at the profile's level); its transport lines (`Using
  network IB`, `NET/IB : Using [0]mlx5_0:1/IB`, `via NET/IB/0/GDRDMA`) say which network, which
  NICs and whether GPUDirect RDMA carried the traffic. gloo (CPU) is recorded the same way: its
  sockets and the interface they leave by. A transport that is not the profile's fails the run
  (`FabricMismatch`) or, with `network.onMismatch: warn`, is reported as a Degraded signal.
- A bandwidth preflight: all-reduce and all-gather over a few sizes up to a stated maximum, bus
  bandwidth computed as nccl-tests computes it, then a message both ways between the first
  processes of neighbouring pods, so one slow link or node is named. Below
  `network.preflight.minBusBandwidthGBps` the run fails (`FabricSlow`) naming the slowest pair.
- Stragglers: in synchronous training every rank waits for the slowest at each collective, so
  step times are equal everywhere and cannot name one. Each rank instead times a fixed piece of
  its own work (a matmul on its device, no communication) at every logging step; a rank
  STRAGGLER_WINDOW times in a row `health.stragglerFactor` times slower than the median of the
  others is named, with its pod and node.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import statistics
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dpo_contract.config import FabricConfig, HealthSignal
from dpo_contract.pod import ENV_NODE_NAME, ENV_POD_NAME, FabricError
from dpo_contract.reports import (
    CollectiveBandwidth,
    FabricReport,
    PairBandwidth,
    PodFabric,
    Preflight,
    straggler_text,
)

log = logging.getLogger(__name__)

NCCL_LOG_PREFIX = "nccl-"
# Every size of the sweep is timed this many times after one warm-up (the mean is reported).
PREFLIGHT_ITERATIONS = {"cuda": 5, "cpu": 2}
PREFLIGHT_SIZES = 4  # max, max/4, max/16, max/64
# The sweep stops growing once it has taken this long: a degraded link must not hold a run for
# an hour before it is reported.
PREFLIGHT_BUDGET_SECONDS = 60.0
STRAGGLER_WINDOW = 3


@dataclass(frozen=True)
class Identity:
    """Who this process is, in the cluster's words."""

    rank: int
    pod: str
    node: str
    first_in_pod: bool


def identity(rank: int, local_rank: int) -> Identity:
    pod = os.environ.get(ENV_POD_NAME) or socket.gethostname()
    return Identity(rank, pod, os.environ.get(ENV_NODE_NAME) or pod, local_rank == 0)


# -- NCCL's log -----------------------------------------------------------------------------


def log_nccl_transport(first_in_pod: bool) -> Path | None:
    """Before NCCL starts: the first process of a pod logs the INIT and NET subsystems at INFO
    into a file of its own (%p: its pid); the file's path, or None."""
    if not first_in_pod:
        return None
    directory = Path(tempfile.mkdtemp(prefix="dpo-nccl-"))
    os.environ["NCCL_DEBUG"] = "INFO"
    os.environ["NCCL_DEBUG_SUBSYS"] = "INIT,NET"
    os.environ["NCCL_DEBUG_FILE"] = str(directory / f"{NCCL_LOG_PREFIX}%p.log")
    return directory / f"{NCCL_LOG_PREFIX}{os.getpid()}.log"


# NCCL's INFO formats (src/init.cc, src/transport/net_ib.cc, net_socket.cc, the channel setup of
# src/transport.cc; aws-ofi-nccl's provider line).
_USING_NETWORK = re.compile(r"NCCL INFO Using network (.+?)\s*$")
_NET_DEVICES = re.compile(r"NCCL INFO NET/(\w+)\s*: Using (.+?)(?:;|$)")
_DEVICE = re.compile(r"\[\d+\](\S+)")
_OFI_PROVIDER = re.compile(r"NET/OFI Selected [Pp]rovider is (\w+).*?found (\d+) nics")
_CHANNEL_VIA_NET = re.compile(r"via NET/([^/\s]+(?: [^/\s]+)?)/\d+(?:\(\d+\))?(/GDRDMA)?")
_GDR_ENABLED = re.compile(r"GPU Direct RDMA Enabled")


def parse_nccl_log(lines: Iterable[str], pod: str, node: str) -> PodFabric | None:
    """The transport, NICs and GPUDirect RDMA of one pod from NCCL's INFO lines; None when they
    say nothing of the network (NCCL never started)."""
    transport: str | None = None
    nics: list[str] = []
    gdr_channels = plain_channels = 0
    gdr_enabled = False
    evidence: list[str] = []

    def keep(line: str) -> None:
        if len(evidence) < 8:
            evidence.append(line.strip()[:300])

    for line in lines:
        if found := _USING_NETWORK.search(line):
            transport = _network_name(found[1])
            keep(line)
        elif found := _NET_DEVICES.search(line):
            nics = [_nic(device[1]) for device in _DEVICE.finditer(found[2])]
            transport = transport or _network_name(found[1])
            keep(line)
        elif found := _OFI_PROVIDER.search(line):
            nics = nics or [f"{found[1]} x{found[2]}"]
            keep(line)
        elif found := _CHANNEL_VIA_NET.search(line):
            transport = transport or _network_name(found[1])
            if found[2]:
                gdr_channels += 1
            else:
                plain_channels += 1
            if gdr_channels + plain_channels == 1:
                keep(line)
        elif _GDR_ENABLED.search(line):
            gdr_enabled = True
    if transport is None:
        return None
    # The channels say what the traffic used; without any (one node), what NCCL enabled.
    gdr = gdr_channels > 0 if gdr_channels + plain_channels else gdr_enabled
    return PodFabric(
        pod=pod,
        node=node,
        backend="nccl",
        transport=transport,
        gpu_direct_rdma=gdr,
        nics=nics,
        evidence=evidence,
    )


def _nic(token: str) -> str:
    """`mlx5_0:1/IB` -> mlx5_0:1 (an HCA and its port); `eth0:10.0.0.5<0>` -> eth0."""
    token = re.sub(r"(/(IB|RoCE))?(<\d+>)?$", "", token)
    name, _, rest = token.partition(":")
    return token if rest.isdigit() else name


def _network_name(name: str) -> str:
    """NCCL's network names, as NCCL_NET takes them (aws-ofi-nccl has called itself
    "AWS Libfabric" and "OFI")."""
    if "Libfabric" in name or name == "OFI":
        return "AWS Libfabric"
    return name.strip()


def pod_transport(me: Identity, nccl_log: Path | None) -> PodFabric | None:
    """What this pod's collectives ran over: gloo's sockets, or what NCCL's log says (None
    when this process kept no log)."""
    if dist.get_backend() == "gloo":
        return gloo_fabric(me, os.environ.get("MASTER_ADDR", "127.0.0.1"))
    if nccl_log is None or not nccl_log.exists():
        return None
    return parse_nccl_log(nccl_log.read_text(errors="replace").splitlines(), me.pod, me.node)


def gloo_fabric(me: Identity, master_addr: str) -> PodFabric:
    """gloo's transport: TCP sockets, leaving by the interface that routes to the rendezvous."""
    address, interface = _route_to(master_addr)
    return PodFabric(
        pod=me.pod,
        node=me.node,
        backend="gloo",
        transport="Socket",
        gpu_direct_rdma=False,
        nics=[interface] if interface else [],
        evidence=[f"gloo: TCP from {address} ({interface or 'unknown interface'})"],
    )


_SIOCGIFADDR = 0x8915


def _route_to(host: str) -> tuple[str, str | None]:
    """This machine's address towards `host`, and the interface that has it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP: nothing is sent, the kernel only picks the route
        address = str(probe.getsockname()[0])
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            with contextlib.suppress(OSError):
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
                if socket.inet_ntoa(reply[20:24]) == address:
                    return address, name
    return address, None


def check_fabric(config: FabricConfig, pods: list[PodFabric], nnodes: int) -> list[str]:
    """Each pod whose transport is not the profile's, or that ran between nodes without the
    GPUDirect RDMA the profile needs."""
    problems = []
    for pod in pods:
        where = f"pod {pod.pod} (node {pod.node})"
        if pod.transport != config.transport:
            seen = "; ".join(pod.evidence[:2])
            problems.append(
                f"{where}: {_backend(pod)} ran over {pod.transport} ({seen}), but "
                f"network.profile {config.profile} needs {config.transport}"
            )
        elif config.gpu_direct_rdma and nnodes > 1 and not pod.gpu_direct_rdma:
            problems.append(
                f"{where}: {_backend(pod)}'s {pod.transport} carried the traffic between nodes "
                f"without GPUDirect RDMA (no GDRDMA channel), which network.profile "
                f"{config.profile} needs: check the nvidia-peermem (or dmabuf) module on the node "
                "and NCCL_NET_GDR_LEVEL"
            )
    return problems


def _backend(pod: PodFabric) -> str:
    return "NCCL" if pod.backend == "nccl" else pod.backend


def mismatch_advice(config: FabricConfig) -> str:
    return (
        f"Check that the pods got their RDMA devices (network.rdmaDevices), the HCAs "
        f"(network.hcas) and the image's NCCL plugin for {config.profile}; or set "
        "network.onMismatch: warn to train on regardless"
    )


# -- the preflight --------------------------------------------------------------------------


def bus_factor(collective: str, world: int) -> float:
    """What each link carries per byte of the result, as nccl-tests counts it."""
    if collective == "all_reduce":
        return 2 * (world - 1) / world
    return (world - 1) / world


def sweep_sizes(max_bytes: int, world: int) -> list[int]:
    """PREFLIGHT_SIZES sizes up to `max_bytes`, each a whole number of float32 per rank."""
    unit = 4 * world
    sizes = {max(max_bytes // 4**i // unit, 1) * unit for i in range(PREFLIGHT_SIZES)}
    return sorted(sizes)


def run_preflight(config: FabricConfig, device: torch.device, me: Identity) -> Preflight:
    """Every rank: the sweep, then the pairs of pods. Collective: all ranks call it together."""
    world = dist.get_world_size()
    started = time.monotonic()
    iterations = PREFLIGHT_ITERATIONS.get(device.type, PREFLIGHT_ITERATIONS["cuda"])
    collectives: list[CollectiveBandwidth] = []
    for size in sweep_sizes(config.preflight_max_bytes, world):
        for name in ("all_reduce", "all_gather"):
            seconds = _time_collective(name, size, world, device, iterations)
            algorithm = size / seconds / 1e9
            collectives.append(
                CollectiveBandwidth(
                    collective=name,
                    bytes=size,
                    seconds=seconds,
                    algorithm_gbps=algorithm,
                    bus_gbps=algorithm * bus_factor(name, world),
                )
            )
        # Every rank saw the same (slowest) times: all stop growing at the same size.
        if time.monotonic() - started > PREFLIGHT_BUDGET_SECONDS:
            break
    pairs = _time_pairs(max(c.bytes for c in collectives), device, me)
    return Preflight(
        world_size=world,
        seconds=time.monotonic() - started,
        collectives=collectives,
        pairs=pairs,
    )


def _time_collective(name: str, size: int, world: int, device: torch.device, runs: int) -> float:
    """Mean seconds of one `name` of `size` bytes (the output's), the slowest rank's."""
    if name == "all_reduce":
        tensor = torch.ones(size // 4, dtype=torch.float32, device=device)

        def once() -> None:
            dist.all_reduce(tensor)

    else:
        output = torch.empty(size // 4, dtype=torch.float32, device=device)
        mine = torch.ones(size // 4 // world, dtype=torch.float32, device=device)

        def once() -> None:
            dist.all_gather_into_tensor(output, mine)

    once()
    seconds = _timed(once, runs, device) / runs
    slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item())


def _timed(work: Callable[[], None], runs: int, device: torch.device) -> float:
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(runs):
        work()
    _synchronize(device)
    return time.perf_counter() - started


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pairs(size: int, device: torch.device, me: Identity) -> list[PairBandwidth]:
    """The first processes of neighbouring pods (0-1, 1-2, ..., last-0) send `size` bytes each
    way, one pair at a time while the others wait; every rank gets every pair's figure."""
    people: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(people, (me.rank, me.pod, me.node, me.first_in_pod))
    leaders = [(rank, pod, node) for rank, pod, node, first in people if first]
    if len(leaders) < 2:
        return []
    neighbours = [(i, (i + 1) % len(leaders)) for i in range(len(leaders))]
    if len(leaders) == 2:
        neighbours = neighbours[:1]
    buffer = torch.ones(size // 4, dtype=torch.float32, device=device)
    measured: list[PairBandwidth] = []
    for a, b in neighbours:
        (rank_a, pod_a, node_a), (rank_b, pod_b, node_b) = leaders[a], leaders[b]
        seconds = torch.zeros(1, dtype=torch.float64, device=device)
        if me.rank in (rank_a, rank_b):
            sends_first = me.rank == rank_a
            other = rank_b if sends_first else rank_a

            def exchange(other: int = other, sends_first: bool = sends_first) -> None:
                if sends_first:
                    dist.send(buffer, other)
                    dist.recv(buffer, other)
                else:
                    dist.recv(buffer, other)
                    dist.send(buffer, other)

            exchange()
            seconds[0] = _timed(exchange, 1, device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        measured.append(
            PairBandwidth(
                pods=[pod_a, pod_b],
                nodes=[node_a, node_b],
                bytes=size,
                gbps=2 * size / float(seconds.item()) / 1e9,
            )
        )
    return measured


def check_bandwidth(config: FabricConfig, preflight: Preflight) -> str | None:
    """Why the preflight fails the run, or None."""
    floor = config.min_bus_bandwidth_gbps
    measured = preflight.bus_bandwidth_gbps
    if floor is None or measured is None or measured >= floor:
        return None
    slowest = preflight.slowest_pair
    culprit = (
        f"; the slowest pair of nodes is {slowest.nodes[0]} and {slowest.nodes[1]} (pods "
        f"{slowest.pods[0]} and {slowest.pods[1]}) at {slowest.gbps:.3g} GB/s"
        if slowest
        else ""
    )
    return (
        f"the preflight all-reduce reached {measured:.3g} GB/s of bus bandwidth, below "
        f"network.preflight.minBusBandwidthGBps ({floor:g}){culprit}; check that link (the "
        "NICs' and switch ports' counters) or keep the node out (scheduling.nodeSelector, a "
        "taint), then start the run again"
    )


def measure_fabric(
    config: FabricConfig,
    device: torch.device,
    me: Identity,
    nnodes: int,
    nccl_log: Path | None,
) -> tuple[FabricReport, HealthSignal | None]:
    """After the process group is up, on every rank: the preflight (which also makes NCCL
    connect), then what each pod's transport was. Raises FabricError for a transport not the
    profile's (unless onMismatch is warn: the signal is returned) or a preflight too slow."""
    preflight = run_preflight(config, device, me) if config.preflight else None
    if not config.preflight:
        dist.barrier()  # NCCL connects at its first collective
    mine = pod_transport(me, nccl_log) if me.first_in_pod else None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    pods = [p for p in gathered if p is not None]
    report = FabricReport(pods=pods, preflight=preflight)
    problems = check_fabric(config, pods, nnodes)
    signal = None
    if problems:
        message = "; ".join(problems)
        if config.on_mismatch == "fail":
            raise FabricError("FabricMismatch", f"{message}. {mismatch_advice(config)}")
        signal = HealthSignal(reason="FabricMismatch", step=0, message=message[:300])
        if me.rank == 0:
            log.warning("fabric: FabricMismatch: %s", message)
    if preflight is not None:
        slow = check_bandwidth(config, preflight)
        if slow is not None:
            raise FabricError("FabricSlow", slow)
        if me.rank == 0:
            log.info("fabric: %s", describe(report))
    return report, signal


def describe(report: FabricReport) -> str:
    summary = report.summary()
    said = f"{summary.transport}, GPUDirect RDMA {'on' if summary.gpu_direct_rdma else 'off'}"
    if summary.bus_bandwidth_gbps is not None:
        said += f", all-reduce bus bandwidth {summary.bus_bandwidth_gbps:.3g} GB/s"
    if summary.slowest_pair:
        said += f", slowest pair {summary.slowest_pair}"
    return said


# -- stragglers -----------------------------------------------------------------------------


def probe_seconds(device: torch.device) -> float:
    """A fixed piece of work on this rank's device, timed: the same on every rank, with no
    communication, so only the device's (or the node's) own speed sets it."""
    # About 20 ms on an H100 and 100 ms on a CPU core: longer than a CFS period, so a node
    # whose CPUs are throttled cannot hide it in one slice of its quota.
    size, runs = (8192, 10) if device.type == "cuda" else (512, 40)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    matrix = torch.ones(size, size, dtype=dtype, device=device) / size
    product = torch.empty_like(matrix)

    def multiply() -> None:
        torch.mm(matrix, matrix, out=product)

    return _timed(multiply, runs, device)


@dataclass(frozen=True)
class RankTime:
    rank: int
    pod: str
    node: str
    seconds: float

    @property
    def labels(self) -> dict[str, str]:
        return {"rank": str(self.rank), "pod": self.pod, "node": self.node}


@dataclass
class StragglerWatch:
    """Feed it every rank's probe time at each logging step; it names the ranks that were
    `factor` times slower than the median of the others at STRAGGLER_WINDOW steps in a row."""

    factor: float
    history: dict[int, deque[float]] = field(default_factory=dict)

    def observe(self, times: list[RankTime]) -> list[tuple[RankTime, float]]:
        flagged = []
        for entry in times:
            others = [t.seconds for t in times if t.rank != entry.rank]
            if not others:
                return []
            ratio = entry.seconds / max(statistics.median(others), 1e-9)
            window = self.history.setdefault(entry.rank, deque(maxlen=STRAGGLER_WINDOW))
            window.append(ratio)
            if len(window) == STRAGGLER_WINDOW and min(window) >= self.factor:
                flagged.append((entry, statistics.median(window)))
        return flagged


def straggler_message(entry: RankTime, ratio: float, factor: float) -> str:
    return (
        f"{straggler_text(entry.rank, entry.pod, entry.node, ratio)} ({STRAGGLER_WINDOW} logs "
        f"in a row, health.stragglerFactor {factor:g}); every rank waits for it"
    )


def gather_probe(me: Identity, device: torch.device) -> list[RankTime]:
    """Every rank's probe (a collective: all ranks at the same step)."""
    mine = RankTime(me.rank, me.pod, me.node, probe_seconds(device))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return list(gathered)


# What the GPU check prints the measured figures next to: NVLink 4 gives an H100 or H200 900
# GB/s (450 GB/s each way); nccl-tests' all-reduce over 8 of them reaches about 450 GB/s of bus
# bandwidth at large sizes.
NVLINK_REFERENCE = (
    "H200 NVLink: 900 GB/s per GPU (450 each way); all-reduce over 8 NVLink GPUs reaches about "
    "450 GB/s of bus bandwidth at 1 GiB (nccl-tests)"
)


def standalone_preflight(max_mib: int) -> int:
    """`dpo-trainer preflight` under torchrun: the same sweep and pairs a run starts with, over
    every process torchrun started (NCCL on GPUs, gloo otherwise), printed by rank 0."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    nccl_log = log_nccl_transport(local == 0) if cuda else None
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    me = identity(dist.get_rank(), local)
    config = FabricConfig(
        profile="preflight",
        transport="Socket",
        gpu_direct_rdma=False,
        preflight_max_bytes=max_mib << 20,
    )
    preflight = run_preflight(config, device, me)
    transport = pod_transport(me, nccl_log)
    if me.rank == 0:
        print(
            f"preflight over {preflight.world_size} {device.type} process(es) in "
            f"{preflight.seconds:.1f} s; transport: {transport.transport if transport else '-'}"
        )
        if preflight.world_size == 1:
            print("one process: nothing crosses a link, bus bandwidth is 0 by definition")
        print(
            f"{'bytes':>12} {'collective':>11} {'time ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11}"
        )
        for row in preflight.collectives:
            print(
                f"{row.bytes:>12} {row.collective:>11} {row.seconds * 1e3:>9.3f} "
                f"{row.algorithm_gbps:>11.2f} {row.bus_gbps:>11.2f}"
            )
        for pair in preflight.pairs:
            print(f"pair {' <-> '.join(pair.nodes)}: {pair.gbps:.2f} GB/s")
        if cuda:
            print(f"reference: {NVLINK_REFERENCE}")
    dist.destroy_process_group()
    return 0
