"""Ray at the scale of processes and machines: a driver killed mid-audit resumes from its shard
cache re-running only the units that are not in it; one audit across a two-node cluster
(``ray start --head`` and ``ray start --address``, the second node in a network namespace the test
creates, or where it cannot, a second raylet on loopback) gives the results of one process.

Every audit here is the example's (examples/model.pt on examples/mni-patches, 600 samples) with
one perturbation at two severities; each is compared with a local audit by
:func:`medaudit.results.audit_content`, results.json without what describes the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medaudit.results import audit_content

pytest.importorskip("ray", reason='the Ray executor needs Ray: pip install "medaudit[ray]"')

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "model.pt"
DATA = ROOT / "examples" / "mni-patches" / "test.npz"
CONFIG = ROOT / "examples" / "mni-patches.yaml"
AUDIT = ["--config", str(CONFIG), "--perturbation", "intensity.gamma", "--severities", "2,4", "--bootstrap", "20",
         "--threads", "1"]
#: The processes the tests start run one torch thread and report no usage statistics.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "medaudit.cli", "run", str(MODEL), "--data", str(DATA), *AUDIT, *args]


def _content(out: Path) -> dict[str, Any]:
    return audit_content(json.loads((out / "results.json").read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The audit in one process: what every Ray run below must give."""
    out = tmp_path_factory.mktemp("local") / "out"
    res = subprocess.run(_cli(["--out", str(out)]), capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr
    return _content(out)


def _session_processes(sid: int) -> list[int]:
    """The processes of session ``sid`` (what a command started with ``start_new_session`` left running)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _end_session(sid: int) -> list[int]:
    """Stop every process of session ``sid`` (SIGTERM, then SIGKILL: Ray's GCS server ignores
    SIGTERM); those still running after."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        for pid in _session_processes(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _session_processes(sid)


def _cached(cache: Path) -> list[str]:
    """The units in the shard cache (not a file the killed driver was still writing)."""
    return sorted(p.name for p in cache.glob("*/shard-*.npz") if not p.name.endswith(".tmp.npz"))


def test_a_driver_killed_mid_audit_resumes_on_ray_running_only_the_units_not_cached(
        tmp_path: Path, local: dict[str, Any]) -> None:
    out, cache = tmp_path / "out", tmp_path / "shared" / "cache"  # the cache outside the output folder
    args = _cli(["--out", str(out), "--cache-dir", str(cache), "--executor", "ray", "--ray-workers", "2",
                 "--shard-size", "32", "--resume"])
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_cached(cache)) < 3:  # a few units done, most of the 19 not
            assert driver.poll() is None, f"the audit ended before the test could kill it: {driver.communicate()}"
            assert time.monotonic() < deadline, "no units were cached in 240 s"
            time.sleep(0.02)
        driver.kill()  # SIGKILL: no handler runs, as when the process dies
        killed = time.monotonic()
        driver.communicate()
        assert not out.exists()  # nothing half-written in place of the outputs
        cached = _cached(cache)
        assert 3 <= len(cached) < 19

        res = subprocess.run(args, capture_output=True, text=True, env=ENV)
        # the private Ray instance shares the driver's fate: Ray ends what ray.init started with it
        # (its agents notice their raylet is gone within a minute)
        while _session_processes(driver.pid) and time.monotonic() < killed + 90:
            time.sleep(0.5)
        orphans = _session_processes(driver.pid)
    finally:
        assert _end_session(driver.pid) == []
    assert not orphans, f"the killed driver's Ray processes {orphans} kept running"
    assert res.returncode == 0, res.stderr
    assert f"resumed {len(cached)} completed shard(s)" in res.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    units = results["environment"]["executor"]["units"]
    ran = {u["unit"] for u in units}
    was_cached = {name[len("shard-"):-len(".npz")] for name in cached}
    assert not ran & was_cached and len(ran) + len(was_cached) == 19  # each unit once: run or resumed
    assert _content(out) == local
    assert not cache.exists() or not any(cache.iterdir())  # a completed audit leaves no units behind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def _namespace() -> Iterator[tuple[str, str, list[str]] | None]:
    """A network namespace joined to this one by a veth pair: (this side's address, its address,
    the command prefix that runs in it); None where namespaces cannot be made (not root, no ``ip``)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield None
        return
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    ns, here, there = f"medaudit-{tag}", f"ma{tag}h", f"ma{tag}n"
    net = f"10.{random.randrange(64, 128)}.{random.randrange(1, 255)}"
    steps = [["ip", "netns", "add", ns], ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", ns], ["ip", "addr", "add", f"{net}.1/24", "dev", here],
             ["ip", "link", "set", here, "up"], ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", there],
             ["ip", "netns", "exec", ns, "ip", "link", "set", there, "up"],
             ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    try:
        made = all(_run(step).returncode == 0 for step in steps)
        yield (f"{net}.1", f"{net}.2", ["ip", "netns", "exec", ns]) if made else None
    finally:
        _run(["ip", "link", "del", here])
        _run(["ip", "netns", "del", ns])


def _ray_start(prefix: list[str], args: list[str], temp: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """``ray start ARGS`` (in its own session, to stop all it starts); the process and its output."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen([*prefix, ray_cli, "start", *args, "--num-cpus", "1", "--temp-dir", temp,
                             "--disable-usage-stats"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    output, _ = proc.communicate(timeout=120)
    return proc, output


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[str, str, dict[str, str]]]:
    """A head and a second node of one CPU each: (the head's HOST:PORT, how the nodes are apart, the
    environment that reaches them: the cluster's token, as every node and driver must hold it)."""
    with _namespace() as ns:
        head_ip, node_ip, prefix = ns if ns is not None else ("127.0.0.1", "127.0.0.1", [])
        how = "the second node in a network namespace" if ns is not None else \
            "two raylets on loopback (no network namespace: not root, or no `ip`)"
        port = _free_port()
        temps = [tempfile.mkdtemp(prefix="ma-ray-") for _ in range(2)]  # short: Ray's socket paths are bounded
        token = Path(temps[0]) / "auth_token"
        token.write_text(secrets.token_hex(32))
        env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        sessions = []
        try:
            head, out = _ray_start([], ["--head", "--node-ip-address", head_ip, "--port", str(port),
                                        "--include-dashboard", "false"], temps[0], env)
            sessions.append(head.pid)
            if head.returncode != 0:
                pytest.skip(f"`ray start --head` failed here, so no cluster can be made: {out[-500:]}")
            node, out = _ray_start(prefix, ["--address", f"{head_ip}:{port}", "--node-ip-address", node_ip], temps[1],
                                  env)
            sessions.append(node.pid)
            if node.returncode != 0:
                pytest.skip(f"`ray start --address` ({how}) failed here: {out[-500:]}")
            yield f"{head_ip}:{port}", how, env
        finally:
            left = [pid for sid in sessions for pid in _end_session(sid)]
            for temp in temps:
                shutil.rmtree(temp, ignore_errors=True)
            assert not left, f"Ray processes {left} outlived the cluster"


def test_one_audit_across_a_two_node_cluster_gives_the_results_of_one_process(
        two_nodes: tuple[str, str, dict[str, str]], tmp_path: Path, local: dict[str, Any]) -> None:
    address, how, env = two_nodes
    out = tmp_path / "out"
    res = subprocess.run(_cli(["--out", str(out), "--executor", "ray", "--ray-address", address, "--ray-workers", "2",
                               "--shard-size", "64"]), capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"{how}: {res.stderr}"
    info = json.loads((out / "results.json").read_text(encoding="utf-8"))["environment"]["executor"]
    assert info["nodes"] == 2 and info["workers"] == 2, how
    assert len({u["node"] for u in info["units"]}) == 2, f"{how}: the units ran on one node only"
    assert _content(out) == local
    report = (out / "report.html").read_text(encoding="utf-8")
    assert f"at {address}: 2 workers on 2 nodes" in report
