"""Training in N processes under torchrun for a retraining job (ENRICH_RETRAIN_NPROC > 1): `train_processes`
writes the job's TrainConfig, corrected rows and settings (pickled, to a private temporary directory) and starts
`python -m training.launch --spec DIR` N times; each process runs `run_spec`, rank 0 writing progress lines
the job relays to its row.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from core.config import Settings
from training import distributed
from training.config import TrainConfig
from training.data import LabelledImages
from training.train import train

log = logging.getLogger(__name__)


def run_spec(spec_dir: Path) -> None:
    """Train the pickled (config, extra rows, settings); rank 0 appends progress to progress.jsonl and writes
    result.json."""
    with open(spec_dir / "spec.pkl", "rb") as f:
        # written by train_processes for this run, in a private temp directory
        cfg, extra, settings = pickle.load(f)

    def progress(update: dict) -> None:
        with open(spec_dir / "progress.jsonl", "a") as out:
            out.write(json.dumps(update, default=str) + "\n")

    model_dir = train(cfg, extra, progress=progress, settings=settings)
    if distributed.is_main():
        (spec_dir / "result.json").write_text(json.dumps({"model_dir": str(model_dir)}))


def train_processes(cfg: TrainConfig, extra: LabelledImages | None = None,
                    progress: Callable[[dict], None] | None = None, *, nproc: int,
                    settings: Settings | None = None) -> Path:
    """``training.train.train`` in ``nproc`` processes under torchrun; the same contract (returns the model
    directory). Rank 0's progress reaches ``progress`` here; whatever it raises (a cancelled job) stops the
    processes and is raised again. A failed run raises RuntimeError with the end of its output."""
    with tempfile.TemporaryDirectory(prefix="enrich-train-") as tmp:
        spec_dir = Path(tmp)
        with open(spec_dir / "spec.pkl", "wb") as f:
            pickle.dump((cfg, extra, settings), f)
        (spec_dir / "progress.jsonl").touch()
        with open(spec_dir / "output.log", "wb") as out:
            proc = subprocess.Popen(distributed.torchrun_command(nproc, "training.launch", ["--spec", str(spec_dir)]),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        seen = 0
        try:
            while True:
                code = proc.poll()
                with open(spec_dir / "progress.jsonl", "rb") as f:
                    f.seek(seen)
                    text = f.read()
                complete = text[:text.rfind(b"\n") + 1]  # a line being written waits for the next look
                seen += len(complete)
                for line in complete.decode().splitlines():
                    if progress is not None:
                        progress(json.loads(line))
                if code is not None:
                    break
                time.sleep(0.5)
        except BaseException:
            _stop(proc)
            raise
        if code != 0:
            tail = (spec_dir / "output.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"distributed training ({nproc} processes) failed with exit status {code}:\n{tail}")
        return Path(json.loads((spec_dir / "result.json").read_text())["model_dir"])


def _stop(proc: subprocess.Popen) -> None:
    """End torchrun and the processes it started (their own session: one signal reaches them all)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
