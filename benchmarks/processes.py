"""Running a benchmarked system in a process of its own: the peers (Quix Streams, Bytewax) with
.venv-peers' python, and streamflow through ``benchmarks.isolated``. The peak RSS of the process
tree is sampled with psutil; the output and dead-letter topics are read back for the output check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "benchmarks" / "peers"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
SAMPLE_S = 0.05
DONE_POLL_S = 0.01
RUN_TIMEOUT_S = 600.0
STALL_S = 15.0

Measures = dict[str, float]


def peers_missing() -> str | None:
    """Why the peer systems cannot run here, or None."""
    if PEERS_PYTHON.exists():
        return None
    return f"peer systems skipped: no {PEERS_PYTHON.relative_to(ROOT)} (run `make bench-peers`)"


def peer_command(system: str, app: str, settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment running peer ``app`` (``quix_clean``, ...) with ``settings``:
    a Quix app takes them as options, a Bytewax flow from BENCH_* variables."""
    env = {**os.environ, "PYTHONPATH": str(PEERS_DIR)}
    if system == "bytewax":
        env.update({f"BENCH_{name.upper()}": value for name, value in settings.items()})
        return [str(PEERS_PYTHON), "-m", "bytewax.run", f"{PEERS_DIR / app}.py:flow"], env
    options = [part for name, value in settings.items() if name != "latency"
               for part in (f"--{name}", value)]
    if settings.get("latency") == "1":
        options.append("--latency")
    return [str(PEERS_PYTHON), str(PEERS_DIR / f"{app}.py"), *options], env


def streamflow_command(config: dict[str, Any], stage: str, records: int | None,
                       folder: Path) -> tuple[list[str], dict[str, str]]:
    """The command running pipeline ``config`` in a process of its own (``benchmarks.isolated``)."""
    path = folder / "pipeline.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "benchmarks.isolated", str(path), stage]
    if records is not None:
        command += ["--records", str(records)]
    return command, {**os.environ, "PYTHONPATH": str(ROOT)}


def tree_cpu_seconds(root: psutil.Process) -> float:
    """The CPU time (user and system) ``root`` and its descendants have used so far, with that
    of the descendants they have waited for; one that ended unwaited for is missed."""
    used = 0.0
    for process in (root, *root.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.Error:  # ended between listing and reading
            continue
        used += times.user + times.system + times.children_user + times.children_system
    return used


class RssSampler:
    """The peak memory of a process and its descendants, sampled every ``SAMPLE_S`` (and their
    CPU time, read when asked: :meth:`cpu_seconds`): the sum of
    their resident set sizes (RSS), and of their proportional set sizes (PSS: a page shared by
    n processes counts 1/n in each). A model worker forks a child to write each checkpoint, which
    shares the worker's pages: the RSS sum counts them twice while it lives, the PSS sum once."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak_bytes = 0
        self.peak_pss_bytes = 0
        self.samples: list[tuple[float, int]] = []  # (unix time, PSS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[int, int]:
        rss = pss = 0
        for process in (self._process, *self._process.children(recursive=True)):
            try:
                memory = process.memory_full_info()
            except psutil.Error:  # ended between listing and reading
                continue
            rss, pss = rss + memory.rss, pss + memory.pss
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss, pss = self._sample()
            except psutil.Error:
                return
            self.samples.append((time.time(), pss))
            self.peak_bytes = max(self.peak_bytes, rss)
            self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
            self._stop.wait(SAMPLE_S)

    def cpu_seconds(self) -> float:
        """The CPU time the process and its descendants have used so far (see
        :func:`tree_cpu_seconds`)."""
        return tree_cpu_seconds(self._process)

    def stop(self) -> float:
        """Stop sampling; the peak RSS sum in MB."""
        self._stop.set()
        self._thread.join()
        return round(self.peak_bytes / 2**20, 1)

    @property
    def pss_peak_mb(self) -> float:
        return round(self.peak_pss_bytes / 2**20, 1)


@contextmanager
def running(command: Sequence[str], env: dict[str, str]
            ) -> Iterator[tuple[subprocess.Popen[bytes], RssSampler]]:
    """``command`` started with its RSS sampled; terminated (then killed) when the block ends."""
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE)
    sampler = RssSampler(process.pid)
    try:
        yield process, sampler
    finally:
        sampler.stop()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_self_timed(command: Sequence[str], env: dict[str, str]) -> Measures:
    """Run ``command``, which prints ``{"events_per_s": ...}`` and exits; add its peak RSS."""
    with running(command, env) as (process, sampler):
        stdout, _ = process.communicate(timeout=RUN_TIMEOUT_S)
        if process.returncode:
            raise RuntimeError(f"{command[2:]} exited with {process.returncode}")
        measures: Measures = json.loads(stdout.decode().strip().splitlines()[-1])
        measures["rss_peak_mb"] = sampler.stop()
        measures["pss_peak_mb"] = sampler.pss_peak_mb
    return measures


def run_until(command: Sequence[str], env: dict[str, str], records: int, mark: Path,
              progress: Callable[[], int], total: int) -> Measures:
    """Run ``command`` until ``progress()`` reaches ``total``: events per second from the
    wall-clock time it wrote to ``mark`` at its first consumed record to then, and its peak RSS.
    When progress stalls for ``STALL_S`` the run ends there (the output check says what lacks)."""
    with running(command, env) as (process, sampler):
        deadline = time.monotonic() + RUN_TIMEOUT_S
        last, moved = -1, time.monotonic()
        while (done := progress()) < total:
            now = time.monotonic()
            if process.poll() is not None:
                raise RuntimeError(f"{command[1:]} exited with {process.returncode} before the end")
            if now > deadline:
                raise TimeoutError(f"{command[1:]} did not finish in {RUN_TIMEOUT_S:.0f} s")
            if done != last:
                last, moved = done, now
            elif done and now - moved > STALL_S:
                print(f"stalled at {done:,} of {total:,} records", flush=True)
                break
            time.sleep(DONE_POLL_S)
        finished = time.time()
        rss = sampler.stop()
    return {"events_per_s": records / (finished - float(mark.read_text())), "rss_peak_mb": rss,
            "pss_peak_mb": sampler.pss_peak_mb}


class TopicWatch:
    """Reads topics on a broker: how many records they hold, and all their records."""

    def __init__(self, bootstrap: str) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watch",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 10,
                                   "enable.partition.eof": True})
        self._partitions: dict[str, list[int]] = {}

    def close(self) -> None:
        self._consumer.close()

    def partitions(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            metadata = self._consumer.list_topics(topic, timeout=10).topics[topic]
            if metadata.error is not None or not metadata.partitions:
                return []  # not created yet
            self._partitions[topic] = sorted(metadata.partitions)
        return self._partitions[topic]

    def tally(self, topics: Iterable[str]) -> Callable[[], int]:
        """A function returning how many records ``topics`` held so far: each call reads what
        arrived since the last (high watermarks lag on Tansu, so records are counted as read)."""
        self._consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)
                               for topic in topics for partition in self.partitions(topic)])
        seen = [0]

        def count() -> int:
            seen[0] += sum(message.error() is None
                           for message in self._consumer.consume(100_000, 0.005))
            return seen[0]
        return count

    def values(self, topic: str) -> list[bytes]:
        """Every record value of ``topic`` (read to each partition's end: under transactions the
        high watermarks count commit markers too)."""
        self._consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)
                               for partition in self.partitions(topic)])
        values: list[bytes] = []
        ended: set[int] = set()
        while len(ended) < len(self.partitions(topic)):
            for message in self._consumer.consume(10_000, 1.0):
                error = message.error()
                if error is None:
                    values.append(message.value())
                elif error.code() == KafkaError._PARTITION_EOF:
                    ended.add(message.partition())
        self._consumer.unassign()
        return values


def check_output(watch: TopicWatch, system: str, output: str, dead_letters: str,
                 expected_output: Counter[str], expected_dead: Counter[bytes],
                 canonical: Callable[[bytes], str]) -> None:
    """Fail unless ``output`` holds exactly ``expected_output`` (records as ``canonical`` writes
    them) and ``dead_letters`` exactly the values of ``expected_dead``."""
    for topic, found, expected in (
        (output, Counter(map(canonical, watch.values(output))), expected_output),
        (dead_letters, Counter(watch.values(dead_letters)), expected_dead),
    ):
        if found != expected:
            missing, extra = expected - found, found - expected
            raise AssertionError(
                f"{system}: {topic} differs from the expected records: {sum(missing.values())} "
                f"missing (e.g. {next(iter(missing), None)!r}), {sum(extra.values())} unexpected "
                f"(e.g. {next(iter(extra), None)!r})")


@contextmanager
def scratch() -> Iterator[Path]:
    """A temporary folder for a run's mark file and pipeline settings."""
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        yield Path(folder)
