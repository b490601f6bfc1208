"""Several hosts (`faceveil.engine.distributed`): the split of the inputs, and a real two-process
run of `faceveil pmt --distributed` on this machine (JAX's CPU backend, gloo collectives; the
coordinator on a free localhost port), which must protect every photo exactly once.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from faceveil.engine import distributed

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# The split


def test_share_is_a_disjoint_cover_that_keeps_equal_stems_together():
    files = ["a/x.jpg", "b/y.jpg", "c/z.png", "d/x.png", "e/w.jpg"]
    parts = [distributed.share(files, process_id=i, num_processes=2) for i in range(2)]
    assert parts == [["a/x.jpg", "c/z.png", "d/x.png"], ["b/y.jpg", "e/w.jpg"]]
    assert sorted(parts[0] + parts[1]) == sorted(files)
    # Same list, same split, in every process; more processes than files leaves some idle.
    assert distributed.share(files, process_id=1, num_processes=2) == parts[1]
    assert distributed.share(files[:1], process_id=1, num_processes=2) == []
    assert distributed.share(files, process_id=0, num_processes=1) == files
    with pytest.raises(ValueError, match="0..1"):
        distributed.share(files, process_id=2, num_processes=2)


def test_settings_come_from_flags_then_the_environment(monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "host0:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.delenv(distributed.ENV_PROCESS_ID, raising=False)
    s = distributed.settings(process_id=0)
    assert s == distributed.Settings("host0:1234", 4, 0)
    assert distributed.settings("other:1", 2, 1) == distributed.Settings("other:1", 2, 1)
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "one")
    with pytest.raises(ValueError, match="FACEVEIL_PROCESS_ID"):
        distributed.settings()


def test_own_path_names_the_process_only_on_a_cluster(monkeypatch):
    assert distributed.own_path("out/report.json") == Path("out/report.json")
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed.jax, "process_index", lambda: 1)
    assert distributed.own_path("out/report.json") == Path("out/report.process1of2.json")


def _faceveil(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "faceveil.engine.commands.cli", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_a_command_with_one_output_refuses_to_be_split(tmp_path):
    proc = _faceveil("veil", "make", "--photos", tmp_path, "--key", tmp_path / "k.veil",
                     "--distributed")
    assert proc.returncode == 1
    assert "--distributed: veil make runs on one host" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Two processes, one command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# kit1 and two_people share the detector's padded shape, so process 0 compiles one detector.
PHOTOS = ("faces/kit_harington/kit1.jpg", "faces/obama/obama1_240p.jpg",
          "multi/two_people.jpg")


def test_two_processes_protect_every_photo_exactly_once(data_dir, tmp_path):
    inputs = [str(data_dir / p) for p in PHOTOS]
    out = tmp_path / "out"
    port = _free_port()
    cluster = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID)
    env = {k: v for k, v in os.environ.items() if k not in cluster}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "faceveil.engine.commands.cli", "pmt", *inputs, "--out", str(out),
         "--iters", "1", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    shares, written = [], 0
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"process {i}:\n{stdout}\n{stderr[-4000:]}"
        m = re.search(rf"faceveil pmt: process {i} of 2: (\d+) of 3 input file\(s\): (.*)",
                      stderr)
        assert m, stderr[-4000:]
        share = m.group(2).split(", ")
        assert len(share) == int(m.group(1))
        shares.append(share)
        # Everything the process reports is about its own photos only.
        for line in stdout.splitlines():
            if ": face " in line or "no face" in line:
                assert line.split(": ")[0] in share, (i, line)
        written += int(re.search(r"(\d+) file\(s\) -> ", stdout).group(1))
    # Disjoint shares whose union is every input, split as `distributed.share` says.
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(inputs)
    assert shares == [distributed.share(inputs, i, 2) for i in range(2)]
    # Every photo's output exists, and the processes wrote as many files as there are: no
    # file was written twice.
    files = sorted(f.name for f in out.iterdir())
    for p in inputs:
        assert f"{Path(p).stem}.png" in files
    assert written == len(files), (written, files)
