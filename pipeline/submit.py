"""``wsi-pipeline submit``: run a stage (or the whole chain) as Slurm job arrays through submitit.

Every task of an array runs the ordinary stage command on the whole manifest; the slide (and
fold) locks share the work between the tasks, so a task that dies or is pre-empted leaves
nothing half-done and the task that replaces it (submitit requeues on pre-emption and timeout)
skips what is finished and takes the dead task's locks over. ``run`` submits segment -> extract
-> train -> evaluate with ``afterok`` dependencies; training runs one array task per
(seed, fold). ``--executor local`` runs the very same tasks as local processes (no cluster; the
stages then run one after the other in this process's lifetime).

Resources come from the YAML ``slurm:`` section, with per-stage overrides, then the flags::

    slurm:
      partition: gpu
      account: mylab
      time: "04:00:00"          # or minutes
      mem: 16G
      cpus_per_task: 8
      array_size: 8             # segment and extract tasks
      setup: ["source /shared/venv/bin/activate"]
      extract: {gpus_per_task: 1, mem: 32G}
      train: {gpus_per_task: 1, time: 120}

GPUs are only ever requested for extract, train and evaluate. Logs: ``<ws>/logs/slurm/<job>/``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from extract.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("segment", "extract", "train", "evaluate")
GPU_STAGES = ("extract", "train", "evaluate")
RESOURCE_FLAGS = ("partition", "account", "time", "mem", "cpus_per_task", "gpus_per_task", "array_size")


@dataclass(frozen=True)
class Resources:
    """What one stage asks Slurm for (per array task)."""

    partition: str | None = None
    account: str | None = None
    time: int | str = 240  # minutes, or Slurm's [D-]HH:MM:SS
    mem: str | None = None
    cpus_per_task: int | None = None
    gpus_per_task: int | None = None
    array_size: int | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()

    def __post_init__(self):
        minutes(self.time)  # validates
        for name in ("cpus_per_task", "array_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"The 'slurm.{name}' parameter must be >= 1. Got {value} instead.")
        if self.gpus_per_task is not None and self.gpus_per_task < 0:
            raise ConfigError(f"The 'slurm.gpus_per_task' parameter must be >= 0. Got {self.gpus_per_task} instead.")
        if self.mem is not None and not re.fullmatch(r"\d+(\.\d+)?[KMGT]?B?", str(self.mem), re.I):
            raise ConfigError(f"The 'slurm.mem' parameter must look like 16G or 4000M. Got {self.mem!r} instead.")


def minutes(value: int | str) -> int:
    """Slurm time (``90``, ``"1:30:00"``, ``"2-00:00:00"``) in whole minutes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"The 'slurm.time' parameter must be >= 1 minute. Got {value} instead.")
        return value
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
    if not m:
        raise ConfigError(f"The 'slurm.time' parameter must be minutes or [D-]HH:MM:SS. Got {value!r} instead.")
    days, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m.group(4) is not None:  # H:M:S
        total = a * 60 + b + (1 if c else 0)
    elif m.group(3) is not None:  # M:S (Slurm) or D-H:M
        total = a * 60 + b if m.group(1) else a + (1 if b else 0)
    else:
        total = a * 60 if m.group(1) else a
    return max(1, days * 24 * 60 + total)


def stage_resources(section: dict | None, stage: str, flags: dict) -> Resources:
    """``slurm:`` top-level keys, then ``slurm.<stage>:``, then command-line flags."""
    from .config import from_dict

    section = dict(section or {})
    per_stage = {s: section.pop(s) for s in STAGES if s in section}
    for name, value in per_stage.items():
        if not isinstance(value, dict):
            raise ConfigError(f"The 'slurm.{name}' key must be a mapping of resources. Got {value!r} instead.")
    merged = {**section, **per_stage.get(stage, {})}
    merged.update({k: v for k, v in flags.items() if v is not None})
    if stage not in GPU_STAGES:
        merged.pop("gpus_per_task", None)
    return from_dict(Resources, merged, where="slurm.")


# -- submission -------------------------------------------------------------------------------

@dataclass
class Plan:
    """One stage to submit: its array size, resources and the command its tasks run."""

    stage: str
    tasks: int
    resources: Resources
    argv: list[str]


def _common_argv(args) -> list[str]:
    out = []
    for flag in ("config", "manifest", "workspace"):
        value = getattr(args, flag, None)
        if value is not None:
            out += [f"--{flag}", str(Path(value).resolve())]
    return out


def plan_stages(args) -> tuple[list[Plan], Path, str | None, bool]:
    """What to submit: (plans, workspace, experiment, tolerate failed slides)."""
    from .config import resolve_stage
    from .segment_stage import SEG_FLAGS, tag_for

    stages = list(STAGES) if args.stage == "run" else [args.stage]
    if args.stage == "run" and args.config is None:
        raise ConfigError("`wsi-pipeline submit run` needs --config YAML (see configs/demo.yaml)")
    seg = resolve_stage(args, "segment", SEG_FLAGS if args.stage == "segment" else ())
    workspace = Path(seg.workspace).resolve()
    slurm = seg.config.slurm
    flags = {name: getattr(args, name, None) for name in RESOURCE_FLAGS}
    base = _common_argv(args)
    extra = list(getattr(args, "stage_args", None) or [])
    if extra and args.stage == "run":
        raise ConfigError("`submit run` takes stage settings from --config only; put them in its sections")
    train_section = seg.config.train_keys()
    tolerate = bool(train_section.get("allow_missing"))

    experiment = None
    folds_runs = 1
    if "train" in stages or "evaluate" in stages:
        from .train_stage import experiment_name

        train_config, recipe = seg.config.resolve_train()
        experiment = (_flag_value(extra, "--experiment")
                      or experiment_name(train_section, seg.config.raw, recipe, train_config))
        folds_runs = len(train_config.seeds) * (_int_flag(extra, "--folds") or train_config.folds)

    plans = []
    for stage in stages:
        res = stage_resources(slurm, stage, flags)
        argv = [stage, *base]
        if stage == "extract" and args.stage == "run":
            argv += ["--seg-tag", tag_for(seg.section)]
        if stage in ("train", "evaluate") and "--experiment" not in extra:
            argv += ["--experiment", experiment]
        if stage == "train" and "--resume" not in extra:
            argv += ["--resume"]
        argv += extra
        if stage in ("segment", "extract"):
            tasks = res.array_size or 1
        elif stage == "train":
            per_stage = (slurm.get("train") or {}).get("array_size") if isinstance(slurm.get("train"), dict) else None
            tasks = per_stage or folds_runs
        else:
            tasks = 1
        plans.append(Plan(stage, tasks, res, argv))
    return plans, workspace, experiment, tolerate


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _int_flag(argv: list[str], flag: str) -> int | None:
    value = _flag_value(argv, flag)
    return int(value) if value and value.isdigit() else None


def _executor(kind: str, folder: Path, plan: Plan, dependency: str | None):
    """A submitit executor for one stage's array."""
    import submitit

    res = plan.resources
    if kind == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
        params = {"job_name": f"wsi-{plan.stage}", "time": minutes(res.time), "array_parallelism": plan.tasks,
                  "signal_delay_s": 120}
        for name in ("partition", "account", "mem", "cpus_per_task", "qos", "constraint"):
            if getattr(res, name) is not None:
                params[name] = getattr(res, name)
        if res.gpus_per_task:
            params["gpus_per_task"] = res.gpus_per_task
        if res.setup:
            params["setup"] = list(res.setup)
        if dependency:
            params["dependency"] = dependency
        ex.update_parameters(**params)
        return ex
    ex = submitit.LocalExecutor(folder=folder)
    gpus = res.gpus_per_task if res.gpus_per_task is not None else (_local_gpus() if plan.stage in GPU_STAGES else 0)
    ex.update_parameters(timeout_min=minutes(res.time), gpus_per_node=gpus)
    return ex


def _local_gpus() -> int:
    """GPUs a local task may see (submitit hides all unless told how many)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def submit(args) -> int:
    from .submit_task import StageTask

    plans, workspace, experiment, tolerate = plan_stages(args)
    folder = workspace / "logs" / "slurm" / "%j"
    (workspace / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
    # The tasks import this very code: the submitting environment's path goes with them.
    root = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])

    submitted: list[tuple[Plan, list]] = []
    dependency = None
    for plan in plans:
        ex = _executor(args.executor, folder, plan, dependency)
        jobs = ex.submit_array([StageTask(plan.stage, plan.argv, str(workspace), experiment, tolerate)
                                for _ in range(plan.tasks)])
        submitted.append((plan, jobs))
        array_id = jobs[0].job_id.split("_")[0]
        shown = array_id if args.executor == "slurm" else ",".join(j.job_id for j in jobs)
        res = plan.resources
        what = ", ".join(f"{k} {v}" for k, v in (("cpus", res.cpus_per_task), ("gpus", res.gpus_per_task),
                                                   ("mem", res.mem), ("time", res.time),
                                                   ("partition", res.partition)) if v)
        print(f"{plan.stage:<8} job {shown}: {plan.tasks} task(s)" + (f" [{what}]" if what and args.executor == "slurm" else "")
              + (f", after {dependency}" if dependency else ""), flush=True)
        if args.executor == "slurm":
            dependency = f"afterok:{array_id}"
            continue
        failed = _wait_local(jobs, plan.stage)
        if failed:
            print(f"{plan.stage}: {failed} of {len(jobs)} task(s) failed (logs: {workspace / 'logs' / 'slurm'}); "
                  "rerun the same command to continue where they stopped", flush=True)
            return 1
    logs = workspace / "logs" / "slurm"
    if args.executor == "slurm":
        ids = ",".join(jobs[0].job_id.split("_")[0] for _, jobs in submitted)
        print(f"watch:  squeue --jobs {ids}   and   wsi-pipeline status --workspace {workspace}")
        print(f"logs:   {logs}/<job id>_<task>/")
    else:
        print(f"done; logs: {logs}\nstatus: wsi-pipeline status --workspace {workspace}")
    return 0


#: Seconds between two looks at a local task's process (submitit's own wait looks once a second).
LOCAL_POLL_S = 0.1


def _wait_local(jobs, stage: str) -> int:
    """Wait for every local task of a stage; returns how many failed (each named with its log)."""
    failed = 0
    for job in jobs:
        while not job.done():
            time.sleep(LOCAL_POLL_S)
        if not _local_task_succeeded(job):  # failed or killed: reported, its work resumable
            failed += 1
            log.warning("%s task %s failed; its log: %s", stage, job.job_id, job.paths.stderr)
    return failed


def _local_task_succeeded(job) -> bool:
    """Whether a finished local task returned. It writes its result file before its process
    ends, on this machine's filesystem: with the process gone, no file means it died (killed,
    out of memory), known at once rather than after submitit's 15-second wait for a late file."""
    if not job.paths.result_pickle.exists():
        return False
    try:
        job.result()
    except Exception:  # the task raised; the error is in its log
        return False
    return True


def add_submit_parser(sub) -> None:
    p = sub.add_parser(
        "submit", help="run a stage, or the whole chain, as Slurm job arrays (or local processes) through submitit",
        description="Submit STAGE (segment | extract | train | evaluate) or 'run' (all four, chained with "
                    "dependencies) as job arrays whose tasks share the work through the slide locks. "
                    "Flags after -- go to the stage command, e.g. `submit segment ... -- --patch-size 128`.",
    )
    p.add_argument("stage", choices=[*STAGES, "run"])
    p.add_argument("--config", type=Path, help="YAML config (its 'slurm:' section sets resources per stage)")
    p.add_argument("--manifest", type=Path)
    p.add_argument("--workspace", type=Path)
    p.add_argument("--executor", choices=["slurm", "local"], default="slurm",
                   help="slurm: sbatch job arrays; local: the same tasks as processes on this machine")
    p.add_argument("--array-size", type=int, help="tasks per segment/extract array (train: one per fold and seed)")
    g = p.add_argument_group("resources (override the config's slurm: section for every stage)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--gpus-per-task", type=int, help="GPUs per task of extract, train and evaluate (never segment)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem", help="memory per task, e.g. 32G")
    g.add_argument("--time", help="time limit per task: minutes or [D-]HH:MM:SS")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")


def submit_command(args) -> int:
    if args.array_size is not None and args.array_size < 1:
        raise ConfigError(f"The '--array-size' parameter must be >= 1. Got {args.array_size} instead.")
    if args.time is not None and str(args.time).isdigit():
        args.time = int(args.time)
    return submit(args)
