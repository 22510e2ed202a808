"""The callable every submitted array task runs (imported only inside jobs and by ``submit``)."""

from __future__ import annotations

from pathlib import Path

import submitit


class StageTask(submitit.helpers.Checkpointable):
    """One array task: ``wsi-pipeline <argv>`` in this process, judged for the dependency chain.

    As a submitit ``Checkpointable`` it is requeued with the same arguments on pre-emption or
    timeout; the slide and fold locks make the requeued task continue where it stopped.

    Success (what ``afterok`` dependencies wait for): the stage exited 0; for segment/extract
    with ``train: allow_missing: true``, failed slides are tolerated (they are recorded); for
    train, folds left to the other array tasks are fine as long as none failed.
    """

    def __init__(self, stage: str, argv: list[str], workspace: str, experiment: str | None = None,
                 tolerate_failed_slides: bool = False):
        self.stage, self.argv, self.workspace = stage, list(argv), workspace
        self.experiment, self.tolerate_failed_slides = experiment, tolerate_failed_slides

    def __call__(self) -> int:
        from .cli import main

        code = main(self.argv)
        if code == 0:
            return 0
        if code == 1 and self.stage in ("segment", "extract") and self.tolerate_failed_slides:
            return code
        if code == 1 and self.stage == "train" and self.experiment and not self.failed_folds():
            return 0  # the folds this task skipped are held by the other array tasks
        raise RuntimeError(f"`wsi-pipeline {' '.join(self.argv)}` exited with {code}; see the log above")

    def failed_folds(self) -> list[str]:
        """Folds that are neither done nor held by a live process (lock)."""
        from .status import train_status

        st = train_status(Path(self.workspace) / "experiments" / self.experiment)
        if st.total is None:
            return ["no splits"]
        return [k for k, _ in st.failures] + ["unfinished"] * (st.pending or 0)
