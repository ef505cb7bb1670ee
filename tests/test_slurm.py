"""`--slurm N`: a study's shards as a Slurm job array and the merge after them, against a real Slurm.

The cluster: Debian's slurm-wlm and munge (.ci/run installs them where apt works), started here as a
single node on localhost: a private munged (its own key and socket), slurmctld and slurmd in the
foreground, on free ports, with every state, spool and log file in a temporary folder and SLURM_CONF
pointing at it. The tests that need it skip, saying why, where it cannot start (not root, the packages
missing, a daemon that does not come up). The reference is the unsharded study run locally: the
merged aggregate.json must be byte-identical to it.

A shard is made to fail once by a sitecustomize.py on the jobs' PYTHONPATH (sbatch passes the
environment on): array task 1 (shard 2) exits with status 3 while a flag file exists, and removes it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from patching.cli import main
from patching.io.files import MARKER, foreign, read_marker

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
N_PAIRS = 6  # two shards of three pairs: enough to interleave, quick on two cores
START_TIMEOUT_S = 60


def cli(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def one_line_error(got: dict, words: str):
    assert got["rc"] == 1, got
    assert words in got["stderr"], (words, got)
    assert got["stderr"].count("\n") == 1 and "Traceback" not in got["stderr"], got


# ----------------------------------------------------------------------------- a one-node Slurm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as slurmd itself measures them, so that the node is not drained."""
    try:
        out = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
        fields = dict(w.split("=", 1) for w in out.split() if "=" in w)
        return int(fields["CPUs"]), int(fields["RealMemory"])
    except (OSError, KeyError, ValueError, subprocess.TimeoutExpired):
        return os.cpu_count() or 1, 1000


def _conf(base: Path, sock: Path) -> str:
    cpus, mem = _node()
    return "\n".join([
        "ClusterName=patchrun-test", "SlurmctldHost=localhost",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
        f"StateSaveLocation={base / 'state'}", f"SlurmdSpoolDir={base / 'spool'}",
        f"SlurmctldPidFile={base / 'slurmctld.pid'}", f"SlurmdPidFile={base / 'slurmd.pid'}",
        f"SlurmctldLogFile={base / 'slurmctld.log'}", f"SlurmdLogFile={base / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",  # no cgroups needed
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none", "ReturnToService=2",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""])


class Cluster:
    """munged, slurmctld and slurmd of a private one-node cluster; stop() ends exactly these."""

    def __init__(self, base: Path):
        self.base, self.procs = base, []
        self.conf = base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self, argv: list[str], name: str):
        log = open(self.base / f"{name}.out", "wb")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=self.env, cwd=self.base))
        log.close()

    def start(self):
        b = self.base
        for d in ("state", "spool", "munge"):
            (b / d).mkdir(mode=0o700)
        key, sock = b / "munge" / "munge.key", b / "munge" / "munge.sock"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._start([_which("munged"), "-F", "-f", f"--key-file={key}", f"--socket={sock}", f"--pid-file={b / 'munged.pid'}",
                     f"--log-file={b / 'munged.log'}", f"--seed-file={b / 'munge' / 'seed'}"], "munged")
        self._until(lambda: sock.exists(), "munged made no socket")
        self.conf.write_text(_conf(b, sock))
        self._start([_which("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld")
        self._start([_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)], "slurmd")
        self._until(lambda: self._sinfo() == "idle", "the node did not become idle in sinfo")

    def _sinfo(self) -> str:
        p = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%t"], capture_output=True, text=True,
                           env=self.env, timeout=30)
        return p.stdout.strip()

    def _until(self, ok, what: str):
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if ok():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited: {self.logs()}")
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {START_TIMEOUT_S} s: {self.logs()}")

    def logs(self) -> str:
        out = []
        for name in ("munged.out", "munged.log", "slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log"):
            p = self.base / name
            if p.exists():
                out.append(f"[{name}] " + " / ".join(p.read_text(errors="replace").splitlines()[-4:]))
        return " ".join(out)[-1500:]

    def run(self, *argv: str) -> str:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=60).stdout

    def stop(self):
        with contextlib.suppress(Exception):  # cancel what is left, so that slurmd leaves no job behind
            ids = self.run("squeue", "-h", "-o", "%i").split()
            if ids:
                self.run("scancel", *ids)
                time.sleep(1)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _which(tool: str) -> str | None:
    """A command's path; the daemons also where a user's PATH lacks /usr/sbin."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    return found


def _why_no_slurm() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root"
    missing = [t for t in (*DAEMONS, *CLIENTS) if _which(t) is None]
    if missing:
        return (f"{missing[0]} is not installed: Debian's slurm-wlm and munge are needed (.ci/run installs them "
                f"where apt works)")
    if importlib.util.find_spec("submitit") is None:
        return "submitit is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def slurm():
    why = _why_no_slurm()
    if why:
        pytest.skip(f"no Slurm test cluster: {why}")
    # short and private: munge's socket path must stay under 108 bytes
    base = Path(tempfile.mkdtemp(prefix="patchrun-slurm-"))
    cluster = Cluster(base)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"no Slurm test cluster: it did not start ({str(exc)[:600]})")
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


PAIRS = [("Michelle", "Jones", "Smith"), ("John", "Mary", "Adams"), ("Alice", "Brown", "Clark"),
         ("David", "Green", "White"), ("Emily", "Hall", "King"), ("Frank", "Lee", "Wood")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two small studies of N_PAIRS pairs: the Michelle example cut short (--batch), and a settings file
    with the same kind of pairs in a JSONL file (--batch settings --pairs FILE)."""
    base = tmp_path_factory.mktemp("slurm-study")
    doc = yaml.safe_load((ROOT / "examples" / "study-michelle.yaml").read_text())
    doc["pairs"]["n"] = N_PAIRS
    doc["study"].update(bootstrap=200, threads=1)
    (base / "study.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (base / "settings.yaml").write_text(yaml.safe_dump({"defaults": {"model": "demo-names"},
                                                        "study": {"bootstrap": 200, "threads": 1}}))
    rows = [{"clean": f"{a} {b} was a top-notch student. {a}", "corrupt": f"{a} {c} was a top-notch student. {a}",
             "target": b, "foil": c} for a, b, c in PAIRS[:N_PAIRS]]
    (base / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"batch": ["--batch", str(base / "study.yaml")],
            "pairs": ["--batch", str(base / "settings.yaml"), "--pairs", str(base / "pairs.jsonl")], "base": base}


@pytest.fixture(scope="module")
def reference(files):
    """Each study run here, unsharded: what the merged studies must equal byte for byte."""
    out = {}
    for name in ("batch", "pairs"):
        out[name] = files["base"] / f"local-{name}"
        got = cli([*files[name], "--out", str(out[name]), "--quiet"])
        assert got["rc"] == 0, got
    return out


@pytest.fixture
def on_cluster(slurm, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.chdir(tmp_path)
    return slurm


def _only_the_study(out: Path):
    """--out holds exactly what a study's marker lists: the scheduler's files lie beside it."""
    mark = read_marker(out)
    assert mark is not None and mark["kind"] == "study"
    assert foreign(out, mark["files"]) == [], foreign(out, mark["files"])
    assert sorted(os.listdir(out)) == sorted([MARKER, *mark["files"]])


# ----------------------------------------------------------------------------- against the cluster


def test_slurm_wait_merges_exactly_the_unsharded_study(on_cluster, files, reference, tmp_path):
    study, local = files["batch"], reference["batch"]
    out = tmp_path / "merged"
    t0 = time.monotonic()
    got = cli([*study, "--slurm", "2", "--wait", "--out", str(out)])
    assert got["rc"] == 0, (got, on_cluster.logs())
    print(f"--slurm 2 --wait: {time.monotonic() - t0:.1f} s")
    text = got["stdout"]
    state = json.loads((tmp_path / ".merged.slurm" / "slurm.json").read_text())
    sub = state["submissions"][0]
    assert state["study"] in text and state["shards"] == 2 and sorted(sub["tasks"]) == ["1", "2"]
    for k, job in sub["tasks"].items():  # printed: the job ids, where each shard will be, how to follow them
        assert f"shard {k}/2: job {job} -> {tmp_path / '.merged.slurm' / 'shards' / k}" in text
        assert f"shard {k}/2 finished (job {job}): 3 pairs ok" in text
    assert f"merged study: {out} (job {sub['merge']})" in text and f"squeue -j {sub['array']},{sub['merge']}" in text
    assert (out / "aggregate.json").read_bytes() == (local / "aggregate.json").read_bytes()
    assert (out / "results.csv").read_bytes() == (local / "results.csv").read_bytes()
    assert json.loads((out / "summary.json").read_text())["shard"] == "merged from 2"
    _only_the_study(out)
    logs = tmp_path / ".merged.slurm" / "logs"
    assert (logs / f"{sub['tasks']['1']}_0_log.out").read_text().count("3 pairs ok") == 1

    # the same command again: refused; with --resume: nothing to do; --overwrite only when idle
    one_line_error(cli([*study, "--slurm", "2", "--out", str(out)]), "pass --resume")
    got = cli([*study, "--slurm", "2", "--out", str(out), "--resume", "--wait"])
    assert got["rc"] == 0 and "already holds the merged study" in got["stdout"], got
    one_line_error(cli([*study, "--slurm", "3", "--out", str(out), "--resume"]), "resume it with --slurm 2")


def test_a_failed_shard_stops_the_merge_and_resume_finishes_the_study(on_cluster, files, reference, tmp_path,
                                                                       monkeypatch):
    study, local = files["pairs"], reference["pairs"]  # --pairs this time
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "flag = os.environ.get('PATCH_RUN_TEST_FAIL_ONCE')\n"
        "if flag and os.environ.get('SLURM_ARRAY_TASK_ID') == '1' and os.path.exists(flag):\n"
        "    os.remove(flag)\n"
        "    sys.stderr.write('injected failure: shard 2 exits with status 3, once\\n')\n"
        "    sys.stderr.flush()\n"
        "    os._exit(3)\n")
    flag = tmp_path / "fail-once"
    flag.write_text("")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("PATCH_RUN_TEST_FAIL_ONCE", str(flag))
    out = tmp_path / "merged"
    t0 = time.monotonic()
    got = cli([*study, "--slurm", "2", "--wait", "--out", str(out)])
    print(f"--slurm 2 --wait, shard 2 failing: {time.monotonic() - t0:.1f} s")
    assert got["rc"] == 1 and not flag.exists(), (got, on_cluster.logs())
    state = json.loads((tmp_path / ".merged.slurm" / "slurm.json").read_text())
    sub = state["submissions"][0]
    err = got["stderr"]
    assert f"patch-run: error: shard 2/2 failed (job {sub['tasks']['2']}: FAILED, exit code 3)" in err, err
    assert "injected failure: shard 2 exits with status 3, once" in err and "--resume" in err.splitlines()[-1]
    assert f"shard 1/2 finished (job {sub['tasks']['1']})" in got["stdout"]
    assert not out.exists()  # the merge did not run: Slurm dropped it, it left no result
    assert "CANCELLED" in on_cluster.run("scontrol", "show", "job", "-o", sub["merge"])
    assert not list((tmp_path / ".merged.slurm" / "logs").glob(f"{sub['merge']}_*result.pkl"))

    t0 = time.monotonic()
    got = cli([*study, "--slurm", "2", "--wait", "--out", str(out), "--resume"])
    print(f"--resume --wait: {time.monotonic() - t0:.1f} s")
    assert got["rc"] == 0, (got, on_cluster.logs())
    state = json.loads((tmp_path / ".merged.slurm" / "slurm.json").read_text())
    again = state["submissions"][1]
    assert list(again["tasks"]) == ["2"] and "shard 1/2 finished earlier: kept" in got["stdout"]  # only shard 2
    assert (out / "aggregate.json").read_bytes() == (local / "aggregate.json").read_bytes()
    _only_the_study(out)


def test_cluster_refusals_submit_nothing(on_cluster, files, tmp_path):
    out = tmp_path / "new" / "o"  # its parent too is made only for a submission that happens
    for argv, words in ((["--slurm-partition", "nowhere"], "sbatch refused the shards: invalid partition"),
                        (["--resume"], "nothing to resume")):
        one_line_error(cli([*files["batch"], "--slurm", "2", "--out", str(out), *argv]), words)
        assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    assert on_cluster.run("squeue", "-h", "-o", "%i").split() == []


# ----------------------------------------------------------------------------- no cluster needed


@pytest.mark.parametrize("argv, words", [
    (["--slurm", "0"], "--slurm (the number of shards) must be an integer >= 1"),
    (["--slurm", "2", "--shard", "1/2"], "drop --shard"),
    (["--wait"], "--wait goes with --slurm N"),
    (["--resume"], "--resume goes with --slurm N"),
    (["--slurm", "2", "--resume", "--overwrite"], "give one"),
    (["--slurm", "2", "--slurm-time", "soon"], "is not a Slurm time"),
    (["--slurm", "2", "--slurm-mem", "lots"], "is not a Slurm memory size"),
    (["--slurm", "2", "--slurm-extra", "array=1-4"], "patch-run sets this sbatch option itself"),
    (["--slurm", "2", "--slurm-extra", "time=10"], "use --slurm-time"),
])
def test_bad_slurm_flags_are_one_line_and_write_nothing(files, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    one_line_error(cli([*files["batch"], "--out", str(tmp_path / "o"), *argv]), words)
    assert os.listdir(tmp_path) == []


def test_no_slurm_on_path_is_one_line(files, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    one_line_error(cli([*files["pairs"], "--slurm", "2", "--out", str(tmp_path / "o")]),
                   "sbatch is not on PATH")
    one_line_error(cli(["circuit", "--batch", str(ROOT / "examples" / "study-ioi-circuit.yaml"), "--slurm", "2",
                        "--out", str(tmp_path / "c")]), "sbatch is not on PATH")
    assert os.listdir(tmp_path) == []


def test_a_controller_that_is_down_is_one_line(files, tmp_path, monkeypatch):
    if shutil.which("scontrol") is None or shutil.which("sbatch") is None:
        pytest.skip("Slurm's client commands are not installed (Debian's slurm-wlm; .ci/run installs it)")
    conf = tmp_path / "down.conf"  # a controller on a port nothing listens on
    conf.write_text(f"ClusterName=down\nSlurmctldHost=localhost\nSlurmctldPort={_free_port()}\n"
                    "NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=p Nodes=localhost Default=YES\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("SLURM_CONF", str(conf))
    monkeypatch.chdir(work)
    t0 = time.monotonic()
    one_line_error(cli([*files["batch"], "--slurm", "2", "--out", str(work / "o")]), "not reachable")
    assert os.listdir(work) == [] and time.monotonic() - t0 < 60
