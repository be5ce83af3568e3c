"""The operator reads rank 0's /metrics, which the user's code serves: a page that says NaN, never
ends, or is huge must not freeze the status, hang a worker or fill the operator's memory."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from dpo_operator.controller.scraper import SCRAPE_MAX_BYTES, SCRAPE_TIMEOUT, scrape

from tests.conftest import job_with

Page = Callable[[BaseHTTPRequestHandler], None]


def page(text: str) -> Page:
    def write(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(text.encode())

    return write


def endless(handler: BaseHTTPRequestHandler) -> None:
    line = b"# HELP x x\n"
    while True:
        handler.wfile.write(line * 100)
        time.sleep(0.01)


@pytest.fixture
def serve() -> Iterator[Callable[[Page], int]]:
    servers: list[ThreadingHTTPServer] = []

    def start(body: Page) -> int:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    body(self)

            def log_message(self, *_: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()


def scrape_rank_zero(port: int) -> object:
    return scrape(job_with(monitoring={"port": port}), "127.0.0.1")[0]


def test_metrics_are_read_from_rank_zero(serve: Callable[[Page], int]) -> None:
    port = serve(
        page(
            'dpo_train_step{dpojob="demo",namespace="ml"} 40\n'
            'dpo_train_loss{dpojob="demo",namespace="ml"} 0.5\n'
            'dpo_train_reward_accuracy{dpojob="demo",namespace="ml"} 0.75\n'
            'dpo_train_max_steps{dpojob="demo",namespace="ml"} 400\n'
            'dpo_train_seconds_per_step{dpojob="demo",namespace="ml"} 2.5\n'
        )
    )
    metrics = scrape_rank_zero(port)
    assert getattr(metrics, "step", None) == 40
    assert getattr(metrics, "reward_accuracy", None) == 0.75
    assert (getattr(metrics, "max_steps", None), getattr(metrics, "seconds_per_step", None)) == (
        400,
        2.5,
    )


def test_a_nan_value_is_left_out_and_the_status_stays_writable(
    serve: Callable[[Page], int],
) -> None:
    port = serve(
        page(
            'dpo_train_step{dpojob="demo",namespace="ml"} 41\n'
            'dpo_train_loss{dpojob="demo",namespace="ml"} NaN\n'
            'dpo_train_reward_margin{dpojob="demo",namespace="ml"} +Inf\n'
        )
    )
    metrics = scrape_rank_zero(port)
    assert getattr(metrics, "step", None) == 41
    assert getattr(metrics, "loss", "unset") is None
    assert getattr(metrics, "reward_margin", "unset") is None
    # The status patch is this, as JSON: the API server refuses a NaN literal.
    json.dumps(metrics.model_dump(mode="json"), allow_nan=False)  # type: ignore[attr-defined]


def test_a_page_that_never_ends_is_given_up_on_within_the_deadline(
    serve: Callable[[Page], int],
) -> None:
    port = serve(endless)
    started = time.monotonic()
    assert scrape_rank_zero(port) is None
    assert time.monotonic() - started < SCRAPE_TIMEOUT + 1.5


def test_a_huge_page_is_not_read_into_memory(serve: Callable[[Page], int]) -> None:
    port = serve(page("# " + "x" * (SCRAPE_MAX_BYTES + 10) + "\n"))
    assert scrape_rank_zero(port) is None


def test_a_page_that_is_not_prometheus_text_is_ignored(serve: Callable[[Page], int]) -> None:
    port = serve(page("<html>{{{ not metrics"))
    assert scrape_rank_zero(port) is None


def test_the_health_signals_that_hold_are_read_by_reason(serve: Callable[[Page], int]) -> None:
    port = serve(
        page(
            'dpo_train_step{dpojob="demo",namespace="ml"} 60\n'
            'dpo_train_degraded{dpojob="demo",namespace="ml",reason="NonFiniteLoss"} 0\n'
            'dpo_train_degraded{dpojob="demo",namespace="ml",reason="MarginsCollapsed"} 1\n'
            'dpo_train_degraded{dpojob="demo",namespace="ml",reason="AccuracyStuck"} 1\n'
            # Not a reason the contract knows (a newer trainer): not passed on to the status.
            'dpo_train_degraded{dpojob="demo",namespace="ml",reason="SomethingNew"} 1\n'
        )
    )
    metrics = scrape_rank_zero(port)
    assert getattr(metrics, "degraded", None) == ["AccuracyStuck", "MarginsCollapsed"]


def test_the_fabric_and_a_straggler_are_read_from_rank_zero(serve: Callable[[Page], int]) -> None:
    """What the preflight measured becomes status.fabric (the largest all-reduce, the slowest
    pair), even before the first step; a straggler is named with its pod and node."""
    labels = 'dpojob="demo",namespace="ml"'
    fabric_page = (
        f'dpo_fabric_info{{{labels},transport="IB",gpu_direct_rdma="true"}} 1\n'
        f'dpo_fabric_bus_bandwidth_gbps{{{labels},collective="all_reduce",bytes="4194304"}} 80\n'
        f'dpo_fabric_bus_bandwidth_gbps{{{labels},collective="all_reduce",bytes="268435456"}} 190\n'
        f'dpo_fabric_bus_bandwidth_gbps{{{labels},collective="all_gather",bytes="268435456"}} 170\n'
        f'dpo_fabric_pair_bandwidth_gbps{{{labels},pods="p-0,p-1",nodes="n-0,n-1"}} 45\n'
        f'dpo_fabric_pair_bandwidth_gbps{{{labels},pods="p-1,p-2",nodes="n-1,n-2"}} 3.5\n'
    )
    before = serve(page(fabric_page))
    metrics, fabric = scrape(job_with(monitoring={"port": before}), "127.0.0.1")
    assert metrics is None  # no step yet
    assert fabric is not None
    assert (fabric.transport, fabric.gpu_direct_rdma) == ("IB", True)
    assert fabric.bus_bandwidth_gbps == 190
    assert fabric.slowest_pair == "p-1 <-> p-2 (n-1 <-> n-2): 3.5 GB/s"
    during = serve(
        page(
            fabric_page + f"dpo_train_step{{{labels}}} 30\n"
            f'dpo_train_degraded{{{labels},reason="Straggler"}} 1\n'
            f'dpo_rank_compute_seconds{{{labels},rank="3",pod="p-1",node="n-1"}} 0.3\n'
            f'dpo_straggler_ratio{{{labels},rank="3",pod="p-1",node="n-1"}} 3.04\n'
        )
    )
    metrics, _ = scrape(job_with(monitoring={"port": during}), "127.0.0.1")
    assert metrics is not None
    assert metrics.degraded == ["Straggler"]
    assert metrics.straggler is not None
    assert "rank 3 (pod p-1 on node n-1) computes 3.0x slower" in metrics.straggler
