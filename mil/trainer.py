"""One fold of MIL training: baseline or MHIM-MIL, early stopping, checkpoints and exact resume.

    config = TrainConfig(model="abmil", mhim={"mask_ratio": 0.5, "mask_ratio_h": 0.01})  # mil.train_config
    result = train_fold(bags, split, config, fold_dir, resume=True, targets=targets, seed=2021, fold=0)
    model = load_student(fold_dir / "best.pt")                 # mil.checkpoints
    rows = predict_bags(model, [(sid, bags.get(sid))], "cpu")  # mil.inference

Protocol (REFERENCE.md sections 5-6): Adam (lr 2e-4, weight decay 1e-5), cosine annealing per
epoch, one bag per step in an order shuffled by a seeded generator; baseline step = task loss
(cross-entropy, or the discrete-time survival NLL) + the student's auxiliary loss; MHIM step via
:class:`mil.mhim.MHIM` with the teacher's EMA after every optimizer step. ``teacher_init: auto``
first trains the baseline of the same fold and seed (in ``fold_dir/baseline``, itself resumable
and skipped once finished) and loads its best weights into the teacher. Validation runs the
student alone in eval mode on full bags every epoch; the model is selected and early-stopped on
the validation AUC (C-index for survival), ties broken by the lower validation loss; the
patience counter runs only after ``min_epochs``.

Files in ``fold_dir``::

    last.pt        everything needed to continue exactly (written atomically every epoch)
    best.pt        the selected student + what evaluation needs to rebuild it
    history.csv    one row per epoch (losses, kept-instance ratio, validation metrics, seconds)
    done.json      the marker of a finished fold (best epoch, validation metrics)
    baseline/      the teacher's baseline run (MHIM with ``teacher_init: auto``)

Resume: a run killed after epoch ``e`` continues from ``last.pt`` with every RNG state restored
(torch, CUDA, NumPy, Python, the shuffling and masking generators), so on the CPU it reaches
bit-for-bit the weights of an uninterrupted run.

:func:`train_fold` is three steps: :func:`_build` (targets, model, optimizer, seeded),
:func:`_resume` or :func:`_init_teacher`, then :func:`_run_epoch` per epoch. The step losses
are summed as float64 tensors on the device and read once per epoch (no per-step host sync).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.errors import CheckpointError, ConfigError, PipelineError
from extract.runtime import atomic_write, atomic_write_text, autocast, autocast_dtype, resolve_device
from mil.checkpoints import (
    CHECKPOINT_VERSION,
    build_student,
    capture_rng_state,
    load_teacher_state,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
    software_versions,
    split_digest,
    teacher_source,
)
from mil.data import BagSet, Targets
from mil.inference import predict_bags
from mil.train_config import TrainConfig, config_fingerprint

__all__ = [
    "FoldResult",
    "TrainingError",
    "EarlyStopping",
    "train_fold",
    "fold_seed",
    "balanced_class_weights",
    "weighted_cross_entropy",
]

log = logging.getLogger(__name__)


class TrainingError(PipelineError):
    """Training diverged (non-finite loss) or cannot go on."""


# --------------------------------------------------------------------------------------------
# losses, seeds
# --------------------------------------------------------------------------------------------


def balanced_class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """``n / (C * n_c)`` per class from integer training labels (absent classes get ``n / C``)."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=n_classes).float()
    return counts.sum() / (n_classes * counts.clamp(min=1))


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over bags of ``weight[y] * CE(logits, y)``; ``logits`` [B, C], ``target`` [B].

    Not ``F.cross_entropy(weight=...)``: its mean divides by the summed weights, which cancels
    them exactly for the usual batch of one bag.
    """
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    return (loss * weight[target]).mean() if weight is not None else loss.mean()


def fold_seed(seed: int, fold: int) -> int:
    """The seed of one (seed, fold) run: distinct per fold, repeatable."""
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def _seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


# --------------------------------------------------------------------------------------------
# early stopping
# --------------------------------------------------------------------------------------------


@dataclass
class EarlyStopping:
    """Selection on a validation score (higher is better), ties broken by the lower loss.

    The patience counter only runs for epochs after ``min_epochs``. A NaN score (e.g. AUC on a
    one-class validation set) counts as -inf, so the loss decides.
    """

    patience: int | None
    min_epochs: int = 0
    best_score: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0
    counter: int = 0

    def update(self, epoch: int, score: float, loss: float) -> bool:
        """Record epoch ``epoch`` (1-based); returns whether it is the new best."""
        score = -math.inf if score is None or math.isnan(score) else float(score)
        loss = math.inf if loss is None or math.isnan(loss) else float(loss)
        improved = score > self.best_score or (score == self.best_score and loss < self.best_loss)
        if improved:
            self.best_score, self.best_loss, self.best_epoch, self.counter = score, loss, epoch, 0
        elif epoch > self.min_epochs:
            self.counter += 1
        return improved

    def should_stop(self, epoch: int) -> bool:
        return self.patience is not None and epoch >= self.min_epochs and self.counter >= self.patience

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# --------------------------------------------------------------------------------------------
# results, files
# --------------------------------------------------------------------------------------------


@dataclass
class FoldResult:
    """Outcome of :func:`train_fold` (also rebuilt from ``done.json`` for a skipped fold)."""

    fold_dir: Path
    seed: int
    fold: int
    status: str  # 'done' (trained now) or 'skipped' (finished before)
    best_epoch: int
    metric: str
    best_value: float
    val_metrics: dict
    epochs_run: int
    seconds_per_epoch: float
    stopped_early: bool = False
    baseline: "FoldResult | None" = None

    @classmethod
    def from_done(cls, fold_dir: Path, done: dict, status: str = "skipped") -> "FoldResult":
        return cls(Path(fold_dir), int(done["seed"]), int(done["fold"]), status, int(done["best_epoch"]),
                   done["metric"], float(done["best_value"]), dict(done["val_metrics"]),
                   int(done["epochs_run"]), float(done["seconds_per_epoch"]), bool(done.get("stopped_early")))


def _write_json(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=True)
    atomic_write_text(path, text + "\n")


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _write_history(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def write(f):
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(v) for k, v in row.items()})

    atomic_write(path, write, mode="w")


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _val_metrics(rows: list[dict], ids: Sequence[str], targets: Targets, task: str,
                 bins: dict[str, int] | None, metric: str) -> dict[str, float]:
    """Validation loss and metrics from :func:`predict_bags` rows."""
    from mil.metrics import concordance_index, multiclass_metrics

    logits = torch.from_numpy(np.stack([r["logits"] for r in rows])).float()
    out: dict[str, float] = {}
    if task == "classification":
        y = np.array([targets.y[s] for s in ids])
        out["loss"] = float(F.cross_entropy(logits, torch.from_numpy(y).long()))
        prob = np.stack([r["prob"] for r in rows])
        m = multiclass_metrics(y, prob)
        out["auc"] = m["auc"]
        out["accuracy"] = m["accuracy"]
        out["balanced_accuracy"] = m["balanced_accuracy"]
        out["f1_macro"] = m["f1_macro"]
    else:
        from mil.survival import nll_survival_loss

        ev = np.array([targets.event[s] for s in ids])
        b = np.array([bins[s] for s in ids])
        out["loss"] = float(nll_survival_loss(logits, torch.from_numpy(b).long(), torch.from_numpy(ev)))
        out["c_index"] = concordance_index(np.array([targets.time[s] for s in ids]), ev,
                                           np.array([r["risk"] for r in rows]))
    return out


def _selection_score(metrics: Mapping[str, float], metric: str) -> float:
    return -metrics["loss"] if metric == "loss" else metrics[metric]


def _youden(y: Sequence[int], p: Sequence[float]) -> float | None:
    from mil.metrics import youden_threshold

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return None
    return float(youden_threshold(y, np.asarray(p, dtype=np.float64)))


# --------------------------------------------------------------------------------------------
# the fold
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What one fold's training holds between its steps (built by :func:`_build`)."""

    fold_dir: Path
    config: TrainConfig
    targets: Targets
    bags: BagSet
    train_ids: list[str]
    val_ids: list[str]
    seed: int
    fold: int
    fingerprint: str
    device: torch.device
    amp_dtype: torch.dtype | None
    run_seed: int
    tgt: dict
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    bins: dict[str, int] | None
    n_out: int
    meta: dict
    student: nn.Module
    wrapper: nn.Module | None
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    stopper: EarlyStopping
    generators: dict[str, torch.Generator]
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    teacher_from: str | None = None

    @property
    def metric(self) -> str:
        return self.config.selection_metric


def train_fold(
    bags: BagSet,
    split: Mapping[str, Sequence[str]],
    config: TrainConfig,
    fold_dir: str | Path,
    resume: bool = False,
    *,
    targets: Targets,
    seed: int | None = None,
    fold: int = 0,
    on_epoch_end: Callable[[Path, int, dict], None] | None = None,
) -> FoldResult:
    """Train (or resume, or skip) one fold and seed.

    Parameters
    ----------
    bags : every bag of the split, in memory.
    split : ``{"train": [...], "val": [...], "test": [...]}`` slide ids (test is not touched).
    config : the experiment's :class:`~mil.train_config.TrainConfig`.
    fold_dir : output folder of this fold (created).
    resume : continue an unfinished run from ``last.pt``; without it an unfinished run is an error.
    targets : labels (classification) or times/events (survival) of every slide.
    seed, fold : the run's identity (``seed`` defaults to ``config.seeds[0]``); together they seed
        everything (:func:`fold_seed`).
    on_epoch_end : called as ``on_epoch_end(fold_dir, epoch, history_row)`` after each epoch's
        checkpoint is written (progress display; an exception raised here stops the run like a
        kill, leaving a resumable ``last.pt``).

    Returns
    -------
    FoldResult
    """
    fold_dir = Path(fold_dir)
    seed = config.seeds[0] if seed is None else int(seed)
    if targets.task != config.task:
        raise ConfigError(f"targets are for {targets.task!r} but the config's task is {config.task!r}")
    train_ids, val_ids = list(split["train"]), list(split["val"])
    if not train_ids or not val_ids:
        raise ConfigError(f"{fold_dir}: the split needs training and validation slides "
                          f"(got {len(train_ids)} train, {len(val_ids)} val)")
    absent = [s for s in train_ids + val_ids if s not in bags]
    if absent:
        raise ConfigError(f"{fold_dir}: {len(absent)} slide(s) of the split have no loaded bag: {absent[:10]}")
    fingerprint = config_fingerprint(config, split)
    done_path, last_path = fold_dir / "done.json", fold_dir / "last.pt"

    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("config_fingerprint") != fingerprint:
            raise CheckpointError(
                f"{fold_dir} holds a finished run with other settings or another split; use a new "
                "experiment name (or delete that folder to retrain it)"
            )
        log.info("%s: finished before (best epoch %s, val %s %.4f); skipped", fold_dir,
                 done["best_epoch"], done["metric"], done["best_value"])
        return FoldResult.from_done(fold_dir, done)
    if last_path.is_file() and not resume:
        raise CheckpointError(
            f"{fold_dir}: an unfinished run is there (last.pt); pass --resume to continue it or delete "
            "the folder to start over"
        )

    # the teacher's baseline first (itself resumable, skipped when finished)
    baseline_result = None
    if config.mhim is not None and config.teacher_init == "auto":
        log.info("%s: training the teacher's baseline (teacher_init: auto)", fold_dir)
        baseline_result = train_fold(bags, split, config.baseline(), fold_dir / "baseline", resume=resume,
                                     targets=targets, seed=seed, fold=fold, on_epoch_end=on_epoch_end)

    run = _build(bags, split, config, fold_dir, targets, seed, fold, fingerprint)
    if last_path.is_file():  # resume (checked above)
        _resume(run, last_path)
    elif run.wrapper is not None:
        _init_teacher(run)

    fold_dir.mkdir(parents=True, exist_ok=True)
    run.bags.to_device(run.device)
    run_meta = {"config": config.to_dict(), "config_fingerprint": fingerprint, "software": software_versions()}
    seconds: list[float] = [float(r["seconds"]) for r in run.history]
    epoch = run.start_epoch
    stopped_early = bool(run.history) and run.stopper.should_stop(run.start_epoch)
    while epoch < config.epochs and not stopped_early:
        t0 = time.perf_counter()
        train = _run_epoch(run, epoch)
        epoch += 1
        row, val = _end_epoch(run, epoch, train, t0, run_meta)
        seconds.append(row["seconds"])
        stopped_early = run.stopper.should_stop(epoch)
        _save_last(run, epoch, run_meta)
        name = f"{fold_dir.parent.name}/{fold_dir.name}" if fold_dir.name == "baseline" else fold_dir.name
        last_one = stopped_early or epoch == config.epochs
        level = logging.INFO if (epoch == run.start_epoch + 1 or epoch % 10 == 0 or last_one) else logging.DEBUG
        log.log(level, "%s epoch %d/%d: train loss %.4f, val loss %.4f, val %s %.4f (best epoch %d), %.2f s/epoch",
                name, epoch, config.epochs, train["loss"], val["loss"], run.metric,
                val["loss"] if run.metric == "loss" else val[run.metric], run.stopper.best_epoch, row["seconds"])
        if on_epoch_end is not None:
            on_epoch_end(fold_dir, epoch, dict(row))

    if stopped_early:
        log.info("%s: early stop after epoch %d (best %d)", fold_dir, epoch, run.stopper.best_epoch)
    result = _finish(run, epoch, stopped_early, seconds)
    result.baseline = baseline_result
    return result


def _build(bags: BagSet, split: Mapping[str, Sequence[str]], config: TrainConfig, fold_dir: Path,
           targets: Targets, seed: int, fold: int, fingerprint: str) -> _Run:
    """Targets on the device, the student (and MHIM wrapper), optimizer and schedule: seeded, fresh."""
    train_ids, val_ids = list(split["train"]), list(split["val"])
    device = resolve_device(config.device)
    amp_dtype = autocast_dtype(device, config.precision)
    task = config.task
    run_seed = fold_seed(seed, fold)
    _seed_everything(run_seed)

    bin_edges = bins = classes = None
    if task == "classification":
        n_out = targets.n_classes
        tgt = {s: torch.tensor([targets.y[s]], dtype=torch.long, device=device) for s in train_ids}
        classes = list(targets.labels.classes)
        weight = None
        if config.class_weights == "balanced":
            weight = balanced_class_weights([targets.y[s] for s in train_ids], n_out).to(device)
            log.info("%s: balanced class weights %s", fold_dir, [round(w, 3) for w in weight.tolist()])

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return weighted_cross_entropy(logits, target, weight)
    else:
        from mil.survival import assign_bins, make_time_bins, nll_survival_loss

        n_out = config.n_bins
        edges = make_time_bins([targets.time[s] for s in train_ids], [targets.event[s] for s in train_ids],
                               config.n_bins)
        bin_edges = edges.tolist()
        all_ids = train_ids + val_ids
        bins = dict(zip(all_ids, assign_bins([targets.time[s] for s in all_ids], edges).tolist()))
        tgt = {s: (torch.tensor([bins[s]], dtype=torch.long, device=device),
                   torch.tensor([targets.event[s]], dtype=torch.long, device=device)) for s in train_ids}

        def loss_fn(logits: torch.Tensor, target) -> torch.Tensor:
            return nll_survival_loss(logits.float(), target[0], target[1])

    feature_mean = feature_std = None
    if config.feature_norm == "standardize":
        feature_mean, feature_std = bags.feature_stats(train_ids)  # training instances only
        bags = bags.subset(train_ids + val_ids).standardized(feature_mean, feature_std)
        feature_mean, feature_std = feature_mean.tolist(), feature_std.tolist()

    meta = {
        "format_version": CHECKPOINT_VERSION,
        "feature_mean": feature_mean, "feature_std": feature_std,
        "model": config.model, "model_kw": dict(config.model_kw), "in_dim": bags.in_dim,
        "n_classes": int(n_out), "task": task, "classes": classes, "bin_edges": bin_edges,
        "mhim": config.mhim.to_dict() if config.mhim is not None else None,
        "seed": seed, "fold": fold, "split_digest": split_digest(split), "protocol": config.protocol,
    }

    # built fresh and seeded; a resume overwrites the states
    student = build_student(meta).to(device)
    wrapper = None
    generators = {"shuffle": torch.Generator().manual_seed(run_seed)}
    if config.mhim is not None:
        from mil.mhim import MHIM

        generators["mask"] = torch.Generator(device=device).manual_seed(run_seed + 1)
        wrapper = MHIM(student, config.mhim, generator=generators["mask"]).to(device)
        params = wrapper.trainable_parameters()
    else:
        params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                 if config.scheduler == "cosine" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return _Run(fold_dir, config, targets, bags, train_ids, val_ids, seed, fold, fingerprint, device, amp_dtype,
                run_seed, tgt, loss_fn, bins, int(n_out), meta, student, wrapper, params, optimizer, scheduler,
                scaler, EarlyStopping(config.patience, config.min_epochs), generators)


def _resume(run: _Run, last_path: Path) -> None:
    """Load every state of ``last.pt`` into ``run`` (weights, optimizer, schedule, stopper, RNGs)."""
    ckpt = read_checkpoint(last_path, map_location=run.device)
    if ckpt.get("config_fingerprint") != run.fingerprint:
        raise CheckpointError(
            f"{last_path}: this unfinished run was started with other settings or another split; "
            "resume it with the same config, or delete the folder to start over"
        )
    if run.wrapper is not None:
        run.wrapper.load_state_dict(ckpt["wrapper"])
    else:
        run.student.load_state_dict(ckpt["student"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    run.stopper.load_state_dict(ckpt["early_stopping"])
    run.history = list(ckpt["history"])
    run.start_epoch = int(ckpt["epoch"])
    run.teacher_from = ckpt.get("teacher_from")
    restore_rng_state(ckpt["rng"], run.generators)
    log.info("%s: resuming after epoch %d/%d", run.fold_dir, run.start_epoch, run.config.epochs)


def _init_teacher(run: _Run) -> None:
    """A new MHIM run: the teacher (and with ``student_init`` the student) from its source."""
    config = run.config
    source = teacher_source(config, run.fold_dir, run.seed, run.fold)
    if source is not None:
        state = load_teacher_state(source, run.meta, run.seed, run.fold, run.meta["split_digest"])
        run.wrapper.init_teacher_from(state)
        if config.student_init != "none":
            run.wrapper.init_student_from(state, config.student_init)
        run.teacher_from = str(source)
        log.info("%s: teacher initialised from %s (student_init: %s)", run.fold_dir, source, config.student_init)
    # the student-init probe forward draws random numbers: re-seed so that the run's random
    # stream does not depend on where the teacher came from
    _seed_everything(run.run_seed)


def _run_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One pass over the training bags in a seeded order, one optimizer step per bag.

    Returns the mean losses ``loss``, ``task``, ``aux``, ``cl``, the ``lr`` used and the mean
    ``kept_ratio`` (instances the student saw; 1 without MHIM).
    The step losses are summed as float64 tensors where they are computed and read once here.
    """
    config, device, wrapper, student = run.config, run.device, run.wrapper, run.student
    n_train = len(run.train_ids)
    total_steps = config.epochs * n_train
    (wrapper or student).train()
    order = torch.randperm(n_train, generator=run.generators["shuffle"]).tolist()
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("loss", "task", "aux", "cl")}
    kept_sum = 0.0
    for pos, idx in enumerate(order):
        sid = run.train_ids[idx]
        step = epoch * n_train + pos
        x = run.bags.get(sid, device).unsqueeze(0)
        target = run.tgt[sid]
        with autocast(device, run.amp_dtype):
            if wrapper is not None:
                loss, info = wrapper.training_step(x, target, step, total_steps, run.loss_fn)
                parts = {"task": info["ce"], "aux": info["aux"], "cl": info["cl"]}
                kept_sum += info["kept_ratio"]
            else:
                out = student(x)
                task_loss = run.loss_fn(out.logits, target)
                loss = student.training_loss(out, target, task_loss)
                parts = {"task": task_loss.detach(), "aux": (loss - task_loss).detach()}
                kept_sum += 1.0
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if config.grad_clip is not None:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if wrapper is not None:
            wrapper.after_optimizer_step(step, total_steps)
        parts["loss"] = loss.detach()
        for k, v in parts.items():
            sums[k] += v.double()
    lr_used = run.optimizer.param_groups[0]["lr"]
    if run.scheduler is not None:
        run.scheduler.step()
    train = {k: float(v) / n_train for k, v in sums.items()}  # the epoch's one host sync
    if not math.isfinite(train["loss"]):
        raise TrainingError(
            f"{run.fold_dir}: the training loss became {train['loss']} in epoch {epoch + 1}; lower the "
            "learning rate, set grad_clip, or check the bags for extreme values. last.pt still holds "
            f"epoch {epoch}"
        )
    return {**train, "lr": lr_used, "kept_ratio": kept_sum / n_train}


def _end_epoch(run: _Run, epoch: int, train: dict[str, float], t0: float, run_meta: dict) -> tuple[dict, dict]:
    """Validate, update early stopping, append the history row and save ``best.pt`` on a new best."""
    config, device, task, wrapper = run.config, run.device, run.config.task, run.wrapper
    model_for_eval = wrapper if (wrapper is not None and config.mhim.grn_at_test) else run.student
    rows = predict_bags(model_for_eval, [(s, run.bags.get(s, device)) for s in run.val_ids], device, task=task,
                        instance_scores=False, autocast_dtype=run.amp_dtype)
    val = _val_metrics(rows, run.val_ids, run.targets, task, run.bins, run.metric)
    improved = run.stopper.update(epoch, _selection_score(val, run.metric), val["loss"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sec = time.perf_counter() - t0
    row = {"epoch": epoch, "lr": train["lr"], "train_loss": train["loss"],
           ("train_ce" if task == "classification" else "train_nll"): train["task"],
           "train_cl": train["cl"], "train_aux": train["aux"], "kept_ratio": train["kept_ratio"]}
    row.update({f"val_{k}": v for k, v in val.items()})
    row.update({"best_epoch": run.stopper.best_epoch, "seconds": sec})
    run.history.append(row)

    best_path = run.fold_dir / "best.pt"
    if improved or not best_path.is_file():
        threshold = None
        if task == "classification" and run.n_out == 2:
            threshold = _youden([run.targets.y[s] for s in run.val_ids], [r["prob"][1] for r in rows])
        best = {**run.meta, "kind": "best", "epoch": epoch, "student": run.student.state_dict(),
                # the EMA teacher at the selected epoch: evaluate reports it next to the student
                "teacher": wrapper.teacher.state_dict() if wrapper is not None else None,
                "grn": wrapper.grn.state_dict() if wrapper is not None and wrapper.grn is not None else None,
                "val_metrics": val, "val_threshold": threshold, "teacher_from": run.teacher_from, **run_meta}
        save_checkpoint(best, best_path)
    return row, val


def _save_last(run: _Run, epoch: int, run_meta: dict) -> None:
    """``last.pt`` (everything to continue exactly) and ``history.csv``, after every epoch."""
    wrapper = run.wrapper
    last = {**run.meta, "kind": "last", "epoch": epoch, "student": run.student.state_dict(),
            "teacher": wrapper.teacher.state_dict() if wrapper is not None else None,
            "wrapper": wrapper.state_dict() if wrapper is not None else None,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "early_stopping": run.stopper.state_dict(), "history": run.history,
            "rng": capture_rng_state(run.generators), "teacher_from": run.teacher_from, **run_meta}
    save_checkpoint(last, run.fold_dir / "last.pt")
    _write_history(run.history, run.fold_dir / "history.csv")


def _finish(run: _Run, epoch: int, stopped_early: bool, seconds: list[float]) -> FoldResult:
    """``done.json`` (the marker of a finished fold) and its :class:`FoldResult`."""
    stopper = run.stopper
    best_row = next(r for r in run.history if r["epoch"] == stopper.best_epoch)
    val_best = {k[4:]: v for k, v in best_row.items() if k.startswith("val_")}
    best_ckpt = read_checkpoint(run.fold_dir / "best.pt")
    done = {
        "seed": run.seed, "fold": run.fold, "best_epoch": stopper.best_epoch, "metric": run.metric,
        "best_value": val_best[run.metric],
        "val_metrics": val_best, "val_threshold": best_ckpt.get("val_threshold"),
        "epochs_run": epoch, "stopped_early": stopped_early,
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else 0.0,
        "config_fingerprint": run.fingerprint, "teacher_from": run.teacher_from,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_json(done, run.fold_dir / "done.json")
    return FoldResult.from_done(run.fold_dir, done, status="done")
