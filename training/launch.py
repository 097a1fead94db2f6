"""One process of a distributed training run, for torchrun to start N of:

    torchrun --standalone --nproc_per_node=N -m training.launch [the options of `enrich train`]

(`enrich train --nproc N` runs exactly that.) A retraining job with ENRICH_RETRAIN_NPROC > 1 trains through
``train_processes``: the same module with ``--spec DIR`` (the job's TrainConfig and corrected rows, pickled),
rank 0 writing progress lines the job relays to its row.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import typer

log = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="`enrich train` as one process of a torchrun run (DistributedDataParallel).")


def _register() -> None:
    from training.cli import train

    app.command()(train)


def _run_spec(spec_dir: Path) -> None:
    """Train the pickled (config, extra rows); rank 0 appends progress to progress.jsonl and writes result.json."""
    from training import distributed
    from training.train import train

    with open(spec_dir / "spec.pkl", "rb") as f:
        cfg, extra = pickle.load(f)  # written by train_processes for this run, in a private temp directory

    def progress(update: dict) -> None:
        with open(spec_dir / "progress.jsonl", "a") as out:
            out.write(json.dumps(update, default=str) + "\n")

    model_dir = train(cfg, extra, progress=progress)
    if distributed.is_main():
        (spec_dir / "result.json").write_text(json.dumps({"model_dir": str(model_dir)}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s %(message)s")
    if argv[:1] == ["--spec"]:
        _run_spec(Path(argv[1]))
        return
    _register()
    app(argv)


def train_processes(cfg, extra=None, progress: Callable[[dict], None] | None = None, *, nproc: int) -> Path:
    """``training.train.train`` in ``nproc`` processes under torchrun; the same contract (returns the model
    directory). Rank 0's progress reaches ``progress`` here; whatever it raises (a cancelled job) stops the
    processes and is raised again. A failed run raises RuntimeError with the end of its output."""
    from training import distributed

    with tempfile.TemporaryDirectory(prefix="enrich-train-") as tmp:
        spec_dir = Path(tmp)
        with open(spec_dir / "spec.pkl", "wb") as f:
            pickle.dump((cfg, extra), f)
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


if __name__ == "__main__":
    main()
