"""One process of a distributed training run, for torchrun to start N of:

    torchrun --standalone --nproc_per_node=N -m training.launch [the options of `enrich train`]

(`enrich train --nproc N` runs exactly that; a retraining job's runs come through `training.processes`.)
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from training.cli import train
from training.processes import run_spec

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="`enrich train` as one process of a torchrun run (DistributedDataParallel).")
app.command()(train)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s %(message)s")
    if argv[:1] == ["--spec"]:
        run_spec(Path(argv[1]))
        return
    app(argv)


if __name__ == "__main__":
    main()
