"""Who is running this process, as the batch scheduler sees it, and is a given job still running.

A slide lock records the Slurm job that took it (``SLURM_JOB_ID``, and for an array task
``SLURM_ARRAY_JOB_ID`` + ``SLURM_ARRAY_TASK_ID``), so that a lock left by a job that was
pre-empted, cancelled or timed out can be taken over at once instead of after the age limit.
The check asks ``squeue`` (then ``sacct``) and answers None whenever neither can say: an unknown
answer never takes a lock over.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

# squeue/sacct states in which the job's processes may still be writing (SUSPENDED processes
# wake up where they stopped). PENDING/REQUEUED jobs have no process: their old locks are dead.
ALIVE_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
                "STAGE_OUT", "RESIZING"}

_CACHE: dict[str, tuple[float, bool | None]] = {}
_CACHE_S = 30.0  # one squeue call per job and half-minute, however many of its locks we meet


def current_job() -> dict:
    """This process's Slurm identity: {'job': '123_4', 'job_id': '130', 'restart': 1} or {}
    outside Slurm.

    ``job`` is how squeue names it (``<array job>_<task>`` for an array task, else the job id);
    ``job_id`` is the SLURM_JOB_ID of this allocation, which a requeued job keeps;
    ``restart`` is SLURM_RESTART_COUNT, which Slurm sets (1, 2, ...) once a job has been
    requeued, after a pre-emption, a node failure or submitit's requeue at the time limit.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return {}
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    name = f"{array}_{task}" if array and task else job_id
    out = {"job": name, "job_id": job_id}
    restart = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    if restart.isdigit():
        out["restart"] = int(restart)
    return out


def earlier_run_of_this_job(info: dict) -> bool:
    """Whether lock ``info`` was left by an earlier run of this very Slurm job (or array task),
    i.e. before it was requeued: same job, lower SLURM_RESTART_COUNT (unset counts as 0).

    That run's processes are gone, wherever they ran, so its locks can be taken over at once.
    Processes of the same run (a job over several nodes, or several GPUs' processes) share the
    job and the count, and never take each other's locks this way.
    """
    mine = current_job()
    if not mine or info.get("job") != mine["job"] or str(info.get("job_id")) != mine["job_id"]:
        return False
    try:
        theirs = int(info.get("restart") or 0)
    except (TypeError, ValueError):
        return False
    return theirs < mine.get("restart", 0)


def job_label(info: dict) -> str:
    """How a lock or record names its holder: ``host:pid`` plus ``slurm 123_4`` when in a job."""
    text = f"{info.get('host', '?')}:{info.get('pid', '?')}"
    return f"{text} (slurm {info['job']})" if info.get("job") else text


def job_running(job: str) -> bool | None:
    """True when Slurm says job ``job`` (``123`` or ``123_4``) still runs, False when it says it
    does not (finished, failed, cancelled, pre-empted, requeued or unknown to it), None when no
    Slurm command is available or answers."""
    now = time.monotonic()
    hit = _CACHE.get(job)
    if hit is not None and now - hit[0] < _CACHE_S:
        return hit[1]
    answer = _ask_squeue(job)
    if answer is None:
        answer = _ask_sacct(job)
    _CACHE[job] = (now, answer)
    return answer


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None


def _ask_squeue(job: str) -> bool | None:
    done = _run(["squeue", "--noheader", "--jobs", job, "--format", "%T"])
    if done is None:
        return None
    if done.returncode != 0:
        # squeue forgets finished jobs after MinJobAge and then calls their id invalid.
        return False if "invalid job id" in (done.stderr or "").lower() else None
    states = {line.strip().upper() for line in done.stdout.splitlines() if line.strip()}
    return bool(states & ALIVE_STATES)


def _ask_sacct(job: str) -> bool | None:
    done = _run(["sacct", "--noheader", "--allocations", "--parsable2", "--jobs", job, "--format", "State"])
    if done is None or done.returncode != 0:
        return None
    states = {line.split()[0].upper() for line in done.stdout.splitlines() if line.strip()}
    if not states:
        return None  # accounting may lag a just-started job: do not guess
    return bool(states & ALIVE_STATES)
