"""Serving workload: latency of ``POST /predict`` for one record at a fixed rate, open loop.

The quickstart pipeline (examples/quickstart.yaml, in this process, on its embedded broker)
trains its model stage ``predict`` on 20,000 generated events and checkpoints it; then
``streamflow serve examples/quickstart.yaml --stage predict`` serves the newest version in a
process of its own (peak RSS sampled), and a keep-alive HTTP/1.1 client on asyncio sends one
sensor record per request at ``rate`` requests per second for ``seconds``, on a schedule fixed in
advance: each
latency runs from the request's scheduled time to its answer read, so a stalled server is
charged for the requests it delays (no coordinated omission). Two seconds at the same rate come
first, untimed. Every answer must carry the served version; requests that fail (a timeout after
10 s, a refused connection, a status other than 200) are counted in ``failed_requests`` and
left out of the percentiles.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.processes import ROOT, Measures, running, scratch
from benchmarks.stats import latency_summary, medians
from connectors.sources.generator import GeneratorConfig, sensor_event
from streamflow.config import load_pipeline
from streamflow.runtime.pipeline import PipelineRunner

WORKLOAD = "serving-predict-one-record"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
TRAINING_EVENTS = 20_000
WARMUP_S = 2.0
REQUEST_TIMEOUT_S = 10.0


def quickstart_environment(folder: Path) -> dict[str, str]:
    """The quickstart's variables: its checkpoints and output under ``folder``, fast generation."""
    (folder / "output").mkdir()
    return {**os.environ, "QUICKSTART_COUNT": str(TRAINING_EVENTS), "QUICKSTART_RATE": "0",
            "QUICKSTART_CHECKPOINTS": str(folder / "checkpoints"),
            "QUICKSTART_OUTPUT": str(folder / "output"), "STREAMFLOW_METRICS_PORT": "0",
            "PYTHONPATH": str(ROOT)}


def train(environ: dict[str, str]) -> None:
    """Run the quickstart until idle in a process of its own (the load generator's then stays
    small: a full garbage collection of the pipeline's objects would stall it): its model stage
    learns and checkpoints versions."""
    subprocess.run([sys.executable, "-m", "benchmarks.serving", "train"], env=environ, cwd=ROOT,
                   check=True)


def _train_here() -> None:
    result = PipelineRunner(load_pipeline(QUICKSTART), until_idle_s=2.0).run()
    if result.exit_code:
        raise RuntimeError(f"the quickstart failed: {result.reason} {result.errors}")


def records(count: int) -> list[bytes]:
    """Sensor records as the quickstart's source makes them (none malformed)."""
    config = GeneratorConfig(seed=3)
    return [sensor_event(config, index)[1] for index in range(count)]


class Connections:
    """Keep-alive HTTP/1.1 connections to the server, one request at a time on each: an idle
    one is reused, else a new one opened. Requests and answers are written and read by hand,
    which costs the load generator a fraction of an HTTP client library's CPU time (it shares
    the machine with the server)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """The status and body of the answer to ``POST path`` with ``body``."""
        while self.idle:  # the most recently used first: the least likely to be closed
            reader, writer = self.idle.pop()
            if not reader.at_eof():
                try:
                    return await self._exchange(reader, writer, path, body)
                except (ConnectionError, asyncio.IncompleteReadError):
                    writer.close()  # closed by the server while idle: try another
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return await self._exchange(reader, writer, path, body)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        path: str, body: bytes) -> tuple[int, bytes]:
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(),
                                                         len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        answer = await reader.readexactly(length)
        if b"connection: close" in head.lower():
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, answer

    def close(self) -> None:
        for _reader, writer in self.idle:
            writer.close()


async def send(url: str, bodies: list[bytes], rate: int, seconds: float
               ) -> tuple[list[float], Counter[str], float, set[int]]:
    """Send ``rate * seconds`` requests on schedule; latencies (ms) of the 200 answers, the
    failures by kind, the seconds from the first scheduled send to the last answer, and the
    versions answered."""
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    versions: set[int] = set()
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connections = Connections(host, int(port))

    async def one(body: bytes, scheduled: float) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, answer = await connections.post("/predict", body)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            failures[type(exc).__name__] += 1
            return
        if status != 200:
            failures[f"HTTP {status}"] += 1
            return
        latencies.append((loop.time() - scheduled) * 1000)
        versions.add(json.loads(answer)["version"])

    count = int(rate * seconds)
    start = loop.time() + 0.05
    tasks = []
    for index in range(count):
        scheduled = start + index / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(bodies[index % len(bodies)], scheduled)))
    await asyncio.gather(*tasks)
    connections.close()
    return latencies, failures, loop.time() - start, versions


def measure(rate: int, seconds: float) -> Measures:
    with scratch() as folder:
        environ = quickstart_environment(folder)
        train(environ)
        command = [sys.executable, "-m", "streamflow", "serve", str(QUICKSTART), "--stage",
                   "predict", "--port", "0"]
        with running(command, environ) as (process, sampler):
            assert process.stdout is not None
            line = process.stdout.readline().decode()  # its first line says where it listens
            if " at http" not in line:
                raise RuntimeError(f"streamflow serve did not start: {line!r}")
            url = line.split(" at ", 1)[1].split("/predict", 1)[0]
            bodies = records(10_000)
            load_before = os.getloadavg()[0]
            asyncio.run(send(url, bodies, rate, WARMUP_S))
            cpu_before, own_before = sampler.cpu_seconds(), time.process_time()
            latencies, failures, elapsed, versions = asyncio.run(send(url, bodies, rate, seconds))
            server_cpu = sampler.cpu_seconds() - cpu_before
            client_cpu = time.process_time() - own_before
            rss = sampler.stop()
    count = len(latencies) + sum(failures.values())
    if failures:  # a timeout or a refusal: counted, and said
        print(f"failed requests: {dict(failures)}", file=sys.stderr, flush=True)
    if not latencies or len(versions) != 1:
        raise RuntimeError(f"answers {len(latencies)}, versions answered {versions}")
    return {"events_per_s": len(latencies) / elapsed, **latency_summary(latencies),
            "failed_requests": sum(failures.values()),
            "rss_peak_mb": rss, "load_1m_before": load_before,
            "server_cpu_ms_per_request": 1000 * server_cpu / count,
            "client_cpu_ms_per_request": 1000 * client_cpu / count}


def run_serving(rate: int, seconds: float, repeat: int) -> list[dict[str, Any]]:
    runs = []
    for round_number in range(repeat):
        found = measure(rate, seconds)
        print(f"round {round_number + 1}: " + ", ".join(f"{k} {v:,.1f}" for k, v in found.items()),
              file=sys.stderr, flush=True)
        runs.append(found)
    return [{"system": "streamflow", "workload": WORKLOAD, "rate": rate, "seconds": seconds,
             **medians(runs)}]


if __name__ == "__main__" and sys.argv[1:] == ["train"]:
    _train_here()
