"""Studies on a Slurm cluster: `--slurm N` submits a study's N shards as one job array, and their merge
as a job that Slurm starts only once every shard has succeeded (`afterok`), through submitit.

    patch-run [COMMAND] --batch STUDY.yaml | --pairs FILE --slurm N [--slurm-partition P] [--slurm-time T]
        [--slurm-gpus-per-task G] [--slurm-cpus-per-task C] [--slurm-mem M] [--slurm-extra KEY=VALUE ...]
        [--out DIR] [--wait] [--resume] [--overwrite]

`--out` is the merged study: the very folder an unsharded run writes, under the same file policy.
Everything the scheduler needs lies beside it, in `.OUT.slurm/` (named after --out, like the policy's
staging folders): `shards/K/` (each the study folder of `--shard K/N`), `logs/` (submitit's pickles
and every job's stdout and stderr) and `slurm.json` (what was submitted, to resume and follow it).
Not inside --out: a study folder holds exactly what its marker lists, and the merge replaces it as a
whole, so logs being written inside it could neither be kept nor be written during the merge.

Each shard job is submitit's pickled call of ShardJob, which reads the study again from the same
files, checks that its hash is the one submitted, and calls run_study with `--shard K/N`, in this
interpreter (patch-run is importable there: the executor's python is sys.executable). The merge job
calls merge.merge. A shard whose job fails or is cancelled leaves the merge unrun (the dependency;
`--kill-on-invalid-dep` makes Slurm drop it); `--resume` submits again only the shards whose folder
is not a complete shard of this study, then the merge. `--wait` follows the jobs with squeue and
the shards' folders (sacct needs accounting, which many clusters and test setups lack).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from patching.core.errors import PatchingError
from patching.core.serial import slug
from patching.io.files import claim, expand, replace_file
from patching.study import merge
from patching.study.pairs import whole
from patching.study.run import Study, read_study, run_study

SLURM_FLAGS = ("slurm_partition", "slurm_time", "slurm_gpus_per_task", "slurm_cpus_per_task", "slurm_mem",
               "slurm_extra", "wait", "resume")  # meaningful only with --slurm
# sbatch options this module sets itself (the array, the dependency, the logs) or that have a flag
OWN_KEYS = {"array": None, "dependency": None, "kill-on-invalid-dep": None, "output": None, "error": None,
            "open-mode": None, "job-name": None, "signal": None, "wrap": None, "parsable": None,
            "partition": "--slurm-partition", "time": "--slurm-time", "gpus-per-task": "--slurm-gpus-per-task",
            "cpus-per-task": "--slurm-cpus-per-task", "mem": "--slurm-mem"}
TOOLS = ("sbatch", "squeue", "scontrol", "scancel", "srun")  # srun: submitit runs each job's python through it
PING_TIMEOUT_S = 30  # scontrol retries a missing configuration for a minute: give up sooner
POLL_FIRST_S, POLL_MAX_S = 1.0, 10.0  # --wait polls often at first (short jobs), then every 10 s
SETTLE_S = 60  # a job Slurm calls COMPLETED whose files this node does not see yet (NFS caching): wait this long
LOST_S = 600  # --wait gives up after squeue has failed this long
TAIL_LINES = 20
STATE_KIND = "slurm"


def add_arguments(ap) -> None:
    """The --slurm flags of every studyable analysis's command."""
    g = ap.add_argument_group("a study on a Slurm cluster (docs/studies.md; needs pip install 'patch-run[slurm]')")
    g.add_argument("--slurm", type=int, metavar="N", help="submit the study's N shards as one Slurm job array and "
                   "their merge as a job that runs once all succeeded; --out is the merged study, the jobs' "
                   "folder (shards, logs) lies beside it as .OUT.slurm/")
    g.add_argument("--slurm-partition", metavar="P", help="the partition of every job [the cluster's default]")
    g.add_argument("--slurm-time", metavar="T", help="each job's time limit: MINUTES, HH:MM:SS or D-HH:MM "
                   "[the partition's default]")
    g.add_argument("--slurm-gpus-per-task", type=int, metavar="G", help="GPUs of each shard job (the merge takes none)")
    g.add_argument("--slurm-cpus-per-task", type=int, metavar="C", help="CPUs of each shard job [1]")
    g.add_argument("--slurm-mem", metavar="M", help="memory of each shard job, e.g. 16G or 4000M")
    g.add_argument("--slurm-extra", action="extend", nargs="+", metavar="KEY=VALUE", help="further sbatch "
                   "options of every job, e.g. account=proj qos=high (KEY alone for a flag such as exclusive)")
    g.add_argument("--wait", action="store_true", help="with --slurm: block until the merge has finished, "
                   "with a line per shard; exit with the merge's status")
    g.add_argument("--resume", action="store_true", help="with --slurm: submit again only the shards that did "
                   "not finish (and the merge), or follow the earlier jobs while they run")


# ----------------------------------------------------------------------------- options


_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def minutes(text: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes, rounded up:
    submitit needs minutes to tell a timeout from a preemption."""
    m = _TIME.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise PatchingError(f"--slurm-time {str(text)[:20]!r} is not a Slurm time: give MINUTES, HH:MM:SS or "
                            f"D-HH:MM, e.g. --slurm-time 2:00:00.")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        total = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        total = (a * 60 + b) * 60 + c
    elif b is not None:  # MM:SS
        total = a * 60 + b
    else:  # MM
        total = a * 60
    if total <= 0:
        raise PatchingError(f"--slurm-time {text[:20]!r} is no time at all: give e.g. --slurm-time 30.")
    return math.ceil(total / 60)


@dataclass(frozen=True)
class SlurmOptions:
    """What --slurm and its flags ask for, checked. Partition, time and extra apply to every job; GPUs,
    CPUs and memory to the shard jobs only (the merge reads CSV files)."""

    shards: int
    partition: str | None = None
    time: str | None = None  # as typed; minutes() for submitit
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    extra: tuple[tuple[str, str | bool], ...] = ()  # (sbatch option without dashes, value or True)
    wait: bool = False
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        whole(self.shards, "--slurm (the number of shards)", 1)
        if self.partition is not None and not re.fullmatch(r"[\w.-]+(,[\w.-]+)*", self.partition):
            raise PatchingError(f"--slurm-partition {self.partition[:40]!r} is not a partition name (or a "
                                f"comma-separated list of them).")
        if self.time is not None:
            minutes(self.time)
        for name, value in (("--slurm-gpus-per-task", self.gpus_per_task), ("--slurm-cpus-per-task", self.cpus_per_task)):
            if value is not None:
                whole(value, name, 1)
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem, re.I):
            raise PatchingError(f"--slurm-mem {self.mem[:20]!r} is not a Slurm memory size: give e.g. 16G or 4000M.")
        if self.resume and self.overwrite:
            raise PatchingError("--resume finishes an earlier submission and --overwrite starts it again: give one.")

    @classmethod
    def from_args(cls, args) -> "SlurmOptions | None":
        """The options of the command line, or None without --slurm (then its other flags are refused)."""
        if getattr(args, "slurm", None) is None:
            stray = [f"--{k.replace('_', '-')}" for k in SLURM_FLAGS if getattr(args, k, None) not in (None, False)]
            if stray:
                raise PatchingError(f"{stray[0]} goes with --slurm N: add --slurm N, or drop {stray[0]}.")
            return None
        return cls(shards=args.slurm, partition=args.slurm_partition, time=args.slurm_time,
                   gpus_per_task=args.slurm_gpus_per_task, cpus_per_task=args.slurm_cpus_per_task,
                   mem=args.slurm_mem, extra=parse_extra(args.slurm_extra or []), wait=bool(args.wait),
                   resume=bool(args.resume), overwrite=bool(getattr(args, "overwrite", False)))

    def _common(self, name: str) -> dict:
        extra = dict(self.extra)
        params = {"job_name": name, "partition": self.partition, "additional_parameters": extra,
                  "time": minutes(self.time) if self.time else None}  # None: no --time, the partition's own
        return {k: v for k, v in params.items() if v is not None}

    def shard_parameters(self, name: str) -> dict:
        """submitit's SlurmExecutor parameters of the shard array."""
        params = self._common(name)
        params.update({k: v for k, v in (("gpus_per_task", self.gpus_per_task), ("cpus_per_task", self.cpus_per_task),
                                          ("mem", self.mem)) if v is not None})
        return params

    def merge_parameters(self, name: str, after: str | None) -> dict:
        """The merge job's: after the array (`afterok`), dropped by Slurm if a shard fails."""
        params = self._common(name)
        if after:
            params["dependency"] = f"afterok:{after}"
            params["additional_parameters"] = {**params["additional_parameters"], "kill-on-invalid-dep": "yes"}
        return params


def parse_extra(items: list[str]) -> tuple[tuple[str, str | bool], ...]:
    """KEY=VALUE (or a bare KEY, a flag) as sbatch options; the ones this module sets are refused."""
    out: dict[str, str | bool] = {}
    for item in items:
        key, eq, value = str(item).partition("=")
        key = key.strip().lstrip("-").replace("_", "-").lower()
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,40}", key):
            raise PatchingError(f"--slurm-extra {str(item)[:40]!r} must be KEY=VALUE with an sbatch option as KEY, "
                                f"e.g. account=proj.")
        if key in OWN_KEYS:
            flag = OWN_KEYS[key]
            raise PatchingError(f"--slurm-extra {key}: " + (f"use {flag}." if flag else
                                                             "patch-run sets this sbatch option itself."))
        if any(c in value for c in "\n\r\0"):
            raise PatchingError(f"--slurm-extra {key}: the value must be one line.")
        out[key] = value if eq else True
    return tuple(out.items())


# ----------------------------------------------------------------------------- where things go


@dataclass(frozen=True)
class Layout:
    """The merged study (--out) and the scheduler's folder beside it."""

    out: Path  # absolute

    @property
    def root(self) -> Path:
        return self.out.parent / f".{self.out.name}.slurm"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state(self) -> Path:
        return self.root / "slurm.json"

    def shard(self, k: int) -> Path:
        return self.root / "shards" / str(k)


def read_state(layout: Layout) -> dict | None:
    """slurm.json of an earlier submission, None when there was none; a folder of another origin fails."""
    if not os.path.lexists(layout.root):
        return None
    try:
        state = json.loads(layout.state.read_text(encoding="utf-8"))
        if state.get("kind") != STATE_KIND or not isinstance(state.get("submissions"), list):
            raise ValueError(state.get("kind"))
    except (OSError, ValueError, AttributeError):
        raise PatchingError(f"{layout.root} exists but holds no patch-run --slurm submission (slurm.json): move it "
                            f"away or pass another --out.") from None
    return state


def write_state(layout: Layout, state: dict):
    replace_file(layout.state, lambda tmp: tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8"))


def finished_shard(layout: Layout, k: int, n: int, study: str) -> dict | None:
    """The summary of shard k if its folder is a complete shard k/n of this study (what merge accepts)."""
    try:
        summary, _ = merge.read_shard(layout.shard(k))
    except PatchingError:
        return None
    return summary if summary.get("study") == study and summary.get("shard") == f"{k}/{n}" else None


def merged(layout: Layout, study: str) -> dict | None:
    """The merged study's summary, if --out holds this study complete."""
    try:
        summary = json.loads((layout.out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(summary, dict) and summary.get("study") == study and summary.get("complete")
    return summary if ok and str(summary.get("shard", "")).startswith("merged") else None


# ----------------------------------------------------------------------------- the jobs (run on the cluster)


@dataclass(frozen=True)
class StudySource:
    """What a job needs to read the study exactly as the command line did: the files (absolute), the
    flags typed, and the folder it was typed in (relative paths inside the study file resolve there)."""

    cwd: str
    batch: str | None
    pairs: str | None
    given: dict
    bootstrap: int | None
    command: str | None

    def read(self) -> Study:
        return read_study(Path(self.batch) if self.batch else None, self.given,
                          Path(self.pairs) if self.pairs else None, self.bootstrap, self.command)


class _Stopped(KeyboardInterrupt):
    """A job told to stop: unwind like Ctrl-C, so that a shard keeps its finished pairs marked incomplete
    (--resume runs it again)."""


def _stop(signum, frame):
    exc = _Stopped()
    exc.signum = signum
    raise exc


def _stop_on_signals():
    """SIGTERM (scancel, preemption) and SIGUSR2 (sent 90 s before the time limit, by submitit's
    `--signal`) stop the job. submitit's own handlers ignore SIGTERM until the SIGKILL, and on SIGUSR2
    requeue or checkpoint, which only Checkpointable callables can use."""
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, _stop)


@dataclass(frozen=True)
class ShardJob:
    """One shard: `--shard K/N` through the API. Its folder is ours (inside the scheduler's folder), so a
    rerun (--resume, a requeue) replaces what an earlier attempt left."""

    source: StudySource
    study: str  # the hash at submission
    shard: tuple[int, int]
    out: str

    def __call__(self) -> dict:
        _stop_on_signals()
        os.chdir(self.source.cwd)
        study = self.source.read()
        if study.hash() != self.study:
            raise PatchingError(f"the study is {study.hash()} now but {self.study} was submitted: its files or "
                                f"model changed; submit it again with --overwrite.")
        k, n = self.shard
        print(f"shard {k}/{n} of study {self.study} into {self.out}", flush=True)
        try:
            summary, _ = run_study(study, Path(self.out), shard=self.shard, say=lambda s: print(s, flush=True),
                                   overwrite=True)
        except _Stopped as exc:  # one line in the log instead of a traceback; the job still fails
            print(f"shard {k}/{n} stopped by {signal.Signals(exc.signum).name}: "
                  f"{getattr(exc, 'kept', None) or 'nothing was written'}.", file=sys.stderr, flush=True)
            raise SystemExit(128 + exc.signum) from None
        return {"shard": f"{k}/{n}", "counts": summary["counts"]}


@dataclass(frozen=True)
class MergeJob:
    """The merge of all N shards into --out; returns the exit status `patch-run merge` would have."""

    shards: tuple[str, ...]
    out: str
    overwrite: bool

    def __call__(self) -> dict:
        _stop_on_signals()
        summary = merge.merge([Path(s) for s in self.shards], Path(self.out), say=lambda s: print(s, flush=True),
                              overwrite=self.overwrite)
        print(f"merged {len(self.shards)} shards into {self.out}", flush=True)
        return {"code": merge.exit_status(summary), "counts": summary["counts"]}


# ----------------------------------------------------------------------------- talking to Slurm


def _run(argv: list[str], timeout: float = PING_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _errors(text: str) -> str:
    """A Slurm tool's complaint on one line: its `error:` messages, else its last line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not set(ln.strip()) <= {"*"}]
    errs = [re.sub(r"^\S+: (error|fatal): ", "", ln) for ln in lines if re.match(r"^\S+: (error|fatal): ", ln)]
    return "; ".join(dict.fromkeys(errs or lines[-1:]))[:300] or "no message"


def check_cluster():
    """Refuse, with one line, where no Slurm can take the jobs: the tools, submitit, the controller."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise PatchingError(f"--slurm needs Slurm's commands, but {missing[0]} is not on PATH: run it on a login "
                            f"node of a Slurm cluster (or use --shard K/N with another scheduler, docs/studies.md).")
    if importlib.util.find_spec("submitit") is None:  # the optional extra
        raise PatchingError("--slurm submits through submitit, which is not installed: pip install "
                            "'patch-run[slurm]'.")
    try:
        ping = _run(["scontrol", "ping"])
    except subprocess.TimeoutExpired:
        raise PatchingError(f"Slurm's controller did not answer within {PING_TIMEOUT_S} s (scontrol ping): is "
                            f"SLURM_CONF right and slurmctld running?") from None
    down = [ln.strip() for ln in ping.stdout.splitlines() if "DOWN" in ln]
    if ping.returncode != 0 or down:
        why = down[0] if down else _errors(ping.stderr + ping.stdout)
        raise PatchingError(f"Slurm's controller is not reachable (scontrol ping: {why}): nothing was submitted.")


def queued(ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """{job id: (state, reason)} of the given jobs still in the queue (pending, running, completing); array
    tasks one by one. None when squeue failed (the controller may be busy: ask again later)."""
    if not ids:
        return {}
    try:
        p = _run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        # every id finished and purged: squeue calls them invalid
        return {} if "Invalid job id" in p.stderr else None
    out = {}
    for line in p.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


def job_end(job_id: str) -> str:
    """How a job that left the queue ended, as Slurm still remembers it (MinJobAge): 'FAILED, exit code 3'."""
    try:
        p = _run(["scontrol", "show", "job", "-o", job_id])
    except subprocess.TimeoutExpired:
        return "its end state is unknown"
    state = re.search(r"\bJobState=(\S+)", p.stdout)
    if p.returncode != 0 or not state:
        return "its end state is no longer known to Slurm"
    code = re.search(r"\bExitCode=(\d+):(\d+)", p.stdout)
    reason = re.search(r"\bReason=(\S+)", p.stdout)
    words = [state.group(1)]
    if code and code.group(1) != "0":
        words.append(f"exit code {code.group(1)}")
    if code and code.group(2) != "0":
        words.append(f"signal {code.group(2)}")
    if reason and reason.group(1) not in ("None", "NonZeroExitCode"):
        words.append(reason.group(1))
    return ", ".join(words)


def cancel(ids: list[str]):
    if ids:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _run(["scancel", *ids])


def log_paths(layout: Layout, job_id: str) -> tuple[Path, Path]:
    """(stderr, stdout) of a job as submitit names them."""
    from submitit.core.utils import JobPaths
    paths = JobPaths(layout.logs, job_id=job_id, task_id=0)
    return paths.stderr, paths.stdout


def result(layout: Layout, job_id: str):
    """('success', value) or ('error', traceback) as submitit pickled it; None when the job left none."""
    from submitit.core.utils import JobPaths, pickle_load
    path = JobPaths(layout.logs, job_id=job_id, task_id=0).result_pickle
    try:
        return pickle_load(path)
    except (OSError, EOFError, ValueError):
        return None


def tail(layout: Layout, job_id: str, n: int = TAIL_LINES) -> tuple[Path, list[str]]:
    """The last lines of a job's stderr (or, when that is empty, its stdout)."""
    err, out = log_paths(layout, job_id)
    for path in (err, out):
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        if any(ln.strip() for ln in lines):
            return path, lines[-n:]
    return err, []


# ----------------------------------------------------------------------------- submitting


@dataclass
class Submission:
    """One submission: shard k's job id, and the merge's."""

    tasks: dict[int, str]
    merge: str
    array: str | None = None
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_json(self) -> dict:
        return {"at": self.at, "array": self.array, "tasks": {str(k): v for k, v in self.tasks.items()},
                "merge": self.merge}

    @classmethod
    def from_json(cls, doc: dict) -> "Submission":
        return cls({int(k): str(v) for k, v in doc["tasks"].items()}, str(doc["merge"]), doc.get("array"), doc["at"])

    def ids(self) -> list[str]:
        return [*self.tasks.values(), self.merge]


def _submit(layout: Layout, opts: SlurmOptions, source: StudySource, study: Study, todo: list[int],
            name: str, overwrite_out: bool) -> Submission:
    """The array of the shards in `todo` and the merge after it, or only the merge. Either all of it is
    submitted or nothing stays queued."""
    import submitit
    n = opts.shards
    shards = [ShardJob(source, study.hash(), (k, n), str(layout.shard(k))) for k in todo]
    job = MergeJob(tuple(str(layout.shard(k)) for k in range(1, n + 1)), str(layout.out), overwrite_out)
    queued_ids: list[str] = []
    captured = io.StringIO()  # submitit prints sbatch's complaint to stderr: it goes into our one line instead
    try:
        with contextlib.redirect_stderr(captured):
            array = None
            if shards:
                ex = submitit.SlurmExecutor(folder=layout.logs, python=sys.executable)
                ex.update_parameters(**opts.shard_parameters(name))
                jobs = ex.submit_array(shards)
                queued_ids += [j.job_id for j in jobs]
                array = jobs[0].job_id.split("_")[0]
            mex = submitit.SlurmExecutor(folder=layout.logs, python=sys.executable)
            mex.update_parameters(**opts.merge_parameters(f"{name}-merge", array))
            merge_id = mex.submit(job).job_id
    except Exception as exc:  # sbatch refused (a partition, a limit): nothing of this submission may run
        cancel(queued_ids)
        what = "the merge" if queued_ids or not shards else "the shards"
        raise PatchingError(f"sbatch refused {what}: {_errors(captured.getvalue() + str(exc))}"
                            + (f" (the shards' jobs {', '.join(queued_ids)} were cancelled)" if queued_ids else "")
                            + ".") from None
    return Submission({k: j for k, j in zip(todo, queued_ids)}, merge_id, array)


# ----------------------------------------------------------------------------- following the jobs


def wait(layout: Layout, sub: Submission, n: int, study: str, say, interval: float = POLL_FIRST_S) -> int:
    """Block until the submission's merge has finished (a line per shard as it ends); the merge's exit
    status. A failed shard: its log's tail on stderr and PatchingError naming it, once every shard of the
    submission has left the queue (so that --resume can go on at once)."""
    pending, failed, gone = dict(sub.tasks), {}, {}  # gone: job -> when it left the queue, its folder unseen
    merge_seen, merge_gone = False, None
    t0 = lost = time.monotonic()
    while True:
        q = queued(sub.ids())
        now = time.monotonic()
        if q is None:  # squeue failed: the controller may be restarting; give up only after a while
            if now - lost > LOST_S:
                raise PatchingError(f"squeue has not answered for {LOST_S // 60} minutes: the jobs "
                                    f"{','.join(sub.ids())} may still run; add --resume --wait to the command later.")
        else:
            lost = now
            for k, job_id in sorted(pending.items()):
                if job_id in q:
                    continue
                done = finished_shard(layout, k, n, study)
                if done:
                    c = done["counts"]
                    say(f"shard {k}/{n} finished (job {job_id}): {c['ok']} pairs ok, {c['skipped']} skipped, "
                        f"{c['failed']} failed")
                else:
                    end = job_end(job_id)
                    if end.startswith("COMPLETED") and now - gone.setdefault(job_id, now) < SETTLE_S:
                        continue  # finished, but a shared disk may show its folder to this node a little later
                    failed[k] = end
                    say(f"shard {k}/{n} did not finish (job {job_id}: {end})")
                del pending[k]
            if not pending and failed:
                cancel([sub.merge])  # it can never run; Slurm may not have dropped it yet
                break
            if not pending and sub.merge not in q:
                if result(layout, sub.merge) and merged(layout, study):
                    break
                merge_gone = merge_gone or now
                if not job_end(sub.merge).startswith("COMPLETED") or now - merge_gone >= SETTLE_S:
                    break
            if not pending and not merge_seen and q.get(sub.merge, ("",))[0] == "RUNNING":
                say(f"merge running (job {sub.merge})")
                merge_seen = True
        time.sleep(min(POLL_MAX_S, interval + (now - t0) / 30))
    if failed:
        for k in sorted(failed):
            _show_tail(layout, sub.tasks[k], f"shard {k}/{n}")
        k = min(failed)
        others = f" (and shards {', '.join(str(x) for x in sorted(failed) if x != k)})" if len(failed) > 1 else ""
        raise PatchingError(f"shard {k}/{n}{others} failed (job {sub.tasks[k]}: {failed[k]}), so the merge was not "
                            f"run; its log ends above; rerun the same command with --resume to submit only the "
                            f"shards that did not finish.")
    return _merge_outcome(layout, sub, study, say)


def _show_tail(layout: Layout, job_id: str, what: str):
    path, lines = tail(layout, job_id)
    print(f"--- {what} (job {job_id}): the end of {path}", file=sys.stderr)
    for line in lines:
        print(f"  | {line}", file=sys.stderr)


def _merge_outcome(layout: Layout, sub: Submission, study: str, say) -> int:
    got = result(layout, sub.merge)
    done = merged(layout, study)
    if got and got[0] == "success" and done:
        c = done["counts"]
        getattr(say, "result", print)(f"{merge.wrote(layout.out)} (merged by job {sub.merge}): {c['ok']} pairs ok, "
                                      f"{c['skipped']} skipped, {c['failed']} failed")
        return int(got[1]["code"])
    _show_tail(layout, sub.merge, "the merge")
    raise PatchingError(f"the merge (job {sub.merge}: {job_end(sub.merge)}) did not write {layout.out}; its log "
                        f"ends above; fix it and rerun the same command with --resume.")


# ----------------------------------------------------------------------------- the command


def command(args, opts: SlurmOptions, given: dict, say: Callable[[str], None] = print,
            analysis: str | None = None) -> int:
    """`patch-run [COMMAND] --batch STUDY.yaml | --pairs FILE --slurm N ...`: submit, print where
    everything goes, and with --wait follow it to the end."""
    if getattr(args, "shard", None) is not None:
        raise PatchingError("--slurm N submits every shard itself: drop --shard (or drop --slurm to run one shard).")
    if not (getattr(args, "batch", None) or getattr(args, "pairs", None)):
        raise PatchingError("--slurm runs a study: give --batch STUDY.yaml or --pairs FILE.")
    check_cluster()
    cwd = os.getcwd()
    path = expand(args.batch) if getattr(args, "batch", None) else None
    pairs_file = expand(args.pairs) if getattr(args, "pairs", None) else None
    bootstrap = getattr(args, "bootstrap", None)
    source = StudySource(cwd, str(Path(cwd, path)) if path else None, str(Path(cwd, pairs_file)) if pairs_file else None,
                         given, None if bootstrap is None else whole(bootstrap, "--bootstrap", 1), analysis)
    study = source.read()
    n, h = opts.shards, study.hash()
    if n > len(study.pairs):
        raise PatchingError(f"--slurm {n} splits a study of {len(study.pairs)} pairs into more shards than pairs: "
                            f"use at most {len(study.pairs)}.")
    stem = slug((path or pairs_file).stem)
    shown = expand(args.out) if args.out else expand("outputs") / stem  # as the user will look for it
    layout = Layout(Path(os.path.abspath(shown)))
    state = read_state(layout)
    shown_root = shown.parent / layout.root.name
    about = (f"study {h}: {len(study.pairs)} pairs in {n} shards; {study.analysis.title(study.options)}, "
             f"model {study.spec.model}")

    todo, earlier = list(range(1, n + 1)), None
    if state is not None:
        if not (opts.resume or opts.overwrite):
            raise PatchingError(f"{shown} was submitted to Slurm before ({shown_root}): pass --resume to finish it, "
                                f"--overwrite to start again, or another --out.")
        if opts.resume and state.get("study") != h:
            raise PatchingError(f"{shown_root} holds the jobs of study {state.get('study')}, not of {h}: the study's "
                                f"files or settings changed since; pass --overwrite to start again.")
        if opts.resume and state.get("shards") != n:
            raise PatchingError(f"{shown} was submitted as --slurm {state.get('shards')}, not {n}: resume it with "
                                f"--slurm {state.get('shards')}, or pass --overwrite to start again.")
        earlier = Submission.from_json(state["submissions"][-1]) if state["submissions"] else None
        busy = _still_queued(earlier)
        if busy and opts.resume:  # nothing to submit yet: follow the jobs that are there
            say(about)
            say(f"the earlier submission is still in the queue ({', '.join(busy)}): following it, nothing submitted")
            _print_where(layout, shown, earlier, n, say)
            return _follow(layout, earlier, n, h, say) if opts.wait else 0
        if busy:
            raise PatchingError(f"the earlier submission to {shown_root} is still in the queue ({', '.join(busy)}): "
                                f"scancel it before --overwrite, or follow it with --resume --wait.")
    elif opts.resume:
        raise PatchingError(f"nothing to resume: {shown} was never submitted with --slurm ({shown_root} does not "
                            f"exist); drop --resume.")

    if opts.resume:
        done = merged(layout, h)
        if done:
            say(about)
            getattr(say, "result", print)(f"{shown} already holds the merged study {h}: nothing to submit.")
            return merge.exit_status(done)
        kept = [k for k in todo if finished_shard(layout, k, n, h)]
        todo = [k for k in todo if k not in kept]
    # the merge must be able to write --out, checked now (nothing is created): a refusal costs nothing
    claim(layout.out, kind="study", overwrite=opts.overwrite).check()
    say(about)
    if opts.resume:
        for k in kept:
            say(f"shard {k}/{n} finished earlier: kept ({shown_root}/shards/{k})")

    with _hold(layout, state) as created:
        try:
            layout.logs.mkdir(exist_ok=True)
            (layout.root / "shards").mkdir(exist_ok=True)
            sub = _submit(layout, opts, source, study, todo, f"patch-run-{stem}"[:60], opts.overwrite)
            submissions = (state or {}).get("submissions", [])  # the history stays: its logs are in logs/
            write_state(layout, {"written_by": "patch-run", "kind": STATE_KIND, "study": h, "shards": n,
                                 "out": str(layout.out), "submissions": [*submissions, sub.to_json()]})
        except BaseException:
            if created:  # made by this call: it holds only this submission's files
                shutil.rmtree(created[0], ignore_errors=True)
            raise
    shards = (f"{len(todo)} shards as job array {sub.array}" if len(todo) > 1 else
              f"shard {todo[0]}/{n} as job {sub.array}" if todo else "no shard (all had finished)")
    getattr(say, "result", print)(f"submitted {shards}, the merge as job {sub.merge}"
                                  + (f" (once {sub.array} has succeeded)" if todo else ""))
    _print_where(layout, shown, sub, n, say)
    return _follow(layout, sub, n, h, say) if opts.wait else 0


def _follow(layout: Layout, sub: Submission, n: int, study: str, say) -> int:
    try:
        return wait(layout, sub, n, study, say)
    except KeyboardInterrupt as exc:  # the jobs are Slurm's now: they keep running
        exc.kept = (f"the Slurm jobs keep running (squeue -j {','.join(sub.ids())}); add --resume --wait to this "
                    f"command to follow them again")
        raise


@contextlib.contextmanager
def _hold(layout: Layout, state: dict | None):
    """The scheduler's folder, locked against a second submission to the same --out: made here (atomic
    mkdir) when there was none, else locked and checked unchanged since it was read. Yields the folders
    this call created (the scheduler's and missing parents), to be removed if the submission fails."""
    created: list[Path] = []
    busy = PatchingError(f"another patch-run is submitting to {layout.out} right now: wait for it, then use --resume.")
    if state is None:
        for parent in reversed(layout.root.parents):
            if not os.path.lexists(parent):
                parent.mkdir()
                created.insert(0, parent)
        try:
            layout.root.mkdir()
        except FileExistsError:
            raise busy from None
        created.insert(0, layout.root)
    fd = os.open(layout.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise busy from None
        if state is not None and read_state(layout) != state:
            raise busy
        yield created
    except BaseException:
        for folder in created[1:]:  # parents, innermost first, once the scheduler's folder is gone
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        os.close(fd)


def _still_queued(sub: Submission | None) -> list[str]:
    """The earlier submission's jobs still in the queue. A merge that waits on a failed shard is not
    waiting for anything (DependencyNeverSatisfied): it is cancelled, a new one takes its place."""
    if sub is None:
        return []
    q = queued(sub.ids())
    if q is None:
        raise PatchingError("squeue did not answer: cannot tell whether the earlier jobs still run; try again.")
    stuck = q.get(sub.merge, ("", ""))[1] == "DependencyNeverSatisfied"
    if stuck and not any(t in q for t in sub.tasks.values()):
        cancel([sub.merge])
        return []
    return sorted(q, key=lambda j: (j == sub.merge, j))


def _print_where(layout: Layout, shown: Path, sub: Submission, n: int, say):
    """Where each shard and the merged study will be, and how to follow the jobs."""
    root = shown.parent / layout.root.name
    rows = sorted(sub.tasks.items())
    for i, (k, job_id) in enumerate(rows):
        if len(rows) <= 8 or i < 3 or i == len(rows) - 1:
            say(f"  shard {k}/{n}: job {job_id} -> {root}/shards/{k}")
        elif i == 3:
            say(f"  ... ({len(rows) - 4} more, the same way)")
    result = getattr(say, "result", print)
    result(f"merged study: {shown} (job {sub.merge}); logs: {root}/logs")
    result(f"follow: squeue -j {','.join(x for x in (sub.array, sub.merge) if x)} (or add --resume --wait to "
           f"this command)")
