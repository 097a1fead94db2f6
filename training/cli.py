"""Training subcommands: `enrich train`, `enrich evaluate`, `enrich promote`, `enrich retrain` (also
`enrich retrain --cancel JOB`).

Modules that import torch (training.train, training.evaluate, training.gate, training.jobs …) or celery
(model.registry) are imported inside the commands that need them, so `enrich --help` starts without either.
"""
from __future__ import annotations

import getpass
import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import typer

from core.config import Settings, get_settings
from core.db import connect, connection
from core.db import database_url as resolve_database_url
from core.images import load_image
from core.options import DatabaseUrl, Embedded
from model.artifacts import store_from_settings
from schemas.taxonomy import load_taxonomy
from training.config import AUGMENTATIONS, CATALOGUE_LABEL_LOSS, LABEL_LOSSES, PRESETS, TrainConfig

if TYPE_CHECKING:
    from model.registry import Decision
    from training.data import LabelledImages


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root `enrich` app."""
    app.command()(retrain)
    app.command()(train)
    app.command()(evaluate)
    app.command()(promote)


def _parse_steps(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise typer.BadParameter("give three step counts: retrieval,classification,joint")
    return parts[0], parts[1], parts[2]


def _train_config(preset: str, options: dict[str, Any]) -> TrainConfig:
    """The preset with the options given (None: the preset's value), checked before any data is read."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}", param_hint="--preset")
    options = dict(options)
    augment, label_loss = options.get("augment"), options.get("label_loss")
    if augment is not None and augment not in AUGMENTATIONS:
        raise typer.BadParameter(f"unknown augmentation {augment!r}; choose from {', '.join(AUGMENTATIONS)}",
                                 param_hint="--augment")
    if label_loss is not None and label_loss not in LABEL_LOSSES:
        raise typer.BadParameter(f"unknown label loss {label_loss!r}; choose from {', '.join(LABEL_LOSSES)}",
                                 param_hint="--label-loss")
    if options.get("catalogue_source") is not None and options.get("dataset") is None:
        options["dataset"] = "catalogue"
    if (options.get("dataset") or PRESETS[preset].dataset) == "catalogue":
        if options.get("catalogue_source") is None:
            raise typer.BadParameter("dataset catalogue needs --catalogue PATH|postgres", param_hint="--catalogue")
        if label_loss is None:
            options["label_loss"] = CATALOGUE_LABEL_LOSS  # seller labels are noisy
    return replace(PRESETS[preset], **{k: v for k, v in options.items() if v is not None})


def _correction_rows(cfg: TrainConfig, settings: Settings) -> LabelledImages:
    """Corrected listings as training rows: labels from Postgres, photos through the worker's fetcher."""
    from training.corrections import correction_labels, corrections_to_images  # lazy: imports torch

    taxonomy = load_taxonomy(cfg.taxonomy)
    with connection(resolve_database_url(settings)) as conn:
        # the hold-out share stays out, as in a retraining job: the gate measures models on it
        labels = correction_labels(conn, taxonomy, holdout="train", share=settings.corrections_holdout)
    typer.echo(f"{len(labels)} corrected label(s) in the database to train on", err=True)
    return corrections_to_images(labels, taxonomy, lambda uri: load_image(uri, settings), cfg.image_size)


def train(
    ctx: typer.Context,
    preset: str = typer.Option("quick", help="starting configuration: quick, quick-lite0, tiny, full, "
                                             "full-lite0, full-gpu or full-gpu-lite0 (default: quick, ~4 min "
                                             "on 2 CPU cores; full-gpu: ResNet-18 at 28 px, ~7 min on one GPU)."),
    strategy: str = typer.Option(None, help="staged (retrieval → classification → joint) or unified "
                                            "(default: the preset's, staged)."),
    backbone: str = typer.Option(None, help="registered backbone: small_cnn, resnet18_lowres, wrn16_8, wrn28_10, "
                                            "efficientnet_lite0, resnet50 (default: the preset's)."),
    weights: Path = typer.Option(None, help="backbone weights file (safetensors or state dict) — needed for "
                                            "a pretrained resnet50 (default: none)."),
    init_from: Path = typer.Option(None, help="start from a saved model directory's weights (same backbone and "
                                              "taxonomy), e.g. the active model (default: fresh weights)."),
    image_size: int = typer.Option(None, help="square input size in pixels (default: the preset's)."),
    steps: str = typer.Option(None, help="staged step counts 'retrieval,classification,joint' "
                                         "(default: the preset's)."),
    time_budget: float = typer.Option(None, help="seconds for the whole run; schedules follow whichever runs "
                                                 "out first, steps or time (default: the preset's)."),
    dataset: str = typer.Option(None, help="fmnist-shop, deepfashion or catalogue (a marketplace's own "
                                           "listings with seller tags as noisy labels, any --taxonomy; "
                                           "needs --catalogue) (default: fmnist-shop)."),
    catalogue: str = typer.Option(None, "--catalogue", help="dataset catalogue: 'postgres' (the listings "
                                  "in ENRICH_DATABASE_URL) or a JSONL export of ListingEvents (file or "
                                  "folder); implies --dataset catalogue (default: none)."),
    task_weights: bool = typer.Option(None, "--task-weights/--no-task-weights", help="per-task loss "
                                      "weights from label counts: attribute groups with few labels weigh by "
                                      "their share, but lifted to a floor; for noisy seller labels (default: "
                                      "off)."),
    label_loss: str = typer.Option(None, help="loss of the category and exclusive groups: ce (plain "
                                   "cross-entropy), gce (generalised CE), bootstrap or small_loss — the last "
                                   "three resist wrong labels (default: the preset's, ce; dataset catalogue: "
                                   "training.config.CATALOGUE_LABEL_LOSS)."),
    correction_repeats: int = typer.Option(None, min=1, help="with --with-corrections: each corrected "
                                           "listing counts this many times (default: the preset's)."),
    weak_label_weight: float = typer.Option(None, min=0.0, max=1.0, help="dataset catalogue: weak labels "
                                            "from listing titles and descriptions (the taxonomy's "
                                            "vocabulary) count with this loss weight; 0 turns them off "
                                            "(default: the preset's, 0.3)."),
    data_dir: Path = typer.Option(None, help="Fashion-MNIST idx directory, or the DeepFashion root with "
                                             "category/ and inshop/ (default: /usr/share/datasets/fashion-mnist)."),
    taxonomy: str = typer.Option(None, help="taxonomy name or JSON path (default: fashion-mnist)."),
    out_dir: Path = typer.Option(None, help="where model directories go (default: <ENRICH_DATA_DIR>/models)."),
    model_version: str = typer.Option(None, help="version name of the new model (default: derived + UTC time)."),
    augment: str = typer.Option(None, help="full (crop, flip, rotation, jitter, erasing), shift "
                                           "(translation instead of crop and rotation), light or none "
                                           "(default: the preset's)."),
    label_smoothing: float = typer.Option(None, help="label smoothing of the softmax heads (default: the "
                                                     "preset's; 0: plain cross-entropy)."),
    flip_tta: bool = typer.Option(None, "--flip-tta/--no-flip-tta", help="the saved model predicts on each "
                                  "photo and its mirror image, averaged: 2× the compute per photo (default: "
                                  "the preset's)."),
    grey_photos: bool = typer.Option(None, "--grey-photos/--no-grey-photos", help="fmnist-shop: also train on "
                                     "each item's Fashion-MNIST image as published (grey, colour unknown), "
                                     "the images published Fashion-MNIST figures use (default: the preset's)."),
    grey_repeats: int = typer.Option(None, min=1, help="fmnist-shop: the grey photos count this many times "
                                     "(their share of classification batches; default: the preset's)."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="mixed-precision training: bf16/fp16 on CUDA, bf16 "
                             "on CPUs that compute it natively (AVX512-BF16, AMX) except for depthwise "
                             "convolutions (slower there); weights stay fp32 (default: on)."),
    seed: int = typer.Option(None, help="random seed (default: 0)."),
    device: str = typer.Option(None, help="auto, cpu or cuda[:n] (default: auto)."),
    workers: int = typer.Option(None, help="DataLoader processes decoding image files (DeepFashion; "
                                           "in-memory sets augment on the device instead; default: the preset's)."),
    register_model: bool = typer.Option(False, "--register", help="record the new model as a candidate in "
                                                                   "the models table (default: no)."),
    with_corrections: bool = typer.Option(False, "--with-corrections", help="add the listings people "
                                          "corrected (latest label per group, from Postgres; photos fetched "
                                          "under the worker's allow-list and limits) to the training split "
                                          "(default: no)."),
    resume: Path = typer.Option(None, help="go on from the stage checkpoint of an interrupted run "
                                "(<out-dir>/<version>.checkpoint.pt, written after each stage; give the same "
                                "options): its stages are not trained again, every process loads it "
                                "(default: a new run)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="train with N processes (DistributedDataParallel): "
                              "re-runs this command under torchrun, as `torchrun --standalone "
                              "--nproc_per_node=N -m training.launch [these options]` does — one process per "
                              "GPU (NCCL), or gloo processes on the CPU. The preset's batch size stays the "
                              "global batch, each process training on 1/N of it; rank 0 alone writes the model "
                              "and registers it (default: 1, one plain process)."),
) -> None:
    """Train the multitask model, evaluate it, calibrate thresholds and save it with a report."""
    from training import distributed  # lazy: imports torch

    if nproc > 1 and not distributed.launched():
        _relaunch(ctx, nproc)
        return

    from training.train import train as run  # lazy: imports torch

    settings = get_settings()
    cfg = _train_config(preset, {
        "strategy": strategy, "backbone": backbone, "weights_path": weights, "image_size": image_size,
        "init_from": init_from, "stage_steps": _parse_steps(steps), "time_budget_s": time_budget,
        "dataset": dataset, "data_dir": data_dir, "taxonomy": taxonomy, "model_version": model_version,
        "seed": seed, "augment": augment, "label_smoothing": label_smoothing, "flip_tta": flip_tta,
        "grey_photos": grey_photos, "grey_repeats": grey_repeats, "amp": amp, "device": device, "workers": workers,
        "out_dir": out_dir or settings.models_dir, "catalogue_source": catalogue, "task_weights": task_weights,
        "weak_label_weight": weak_label_weight, "correction_repeats": correction_repeats, "label_loss": label_loss,
        "resume": resume,
    })
    if backbone == "resnet50" and weights is None:
        typer.echo("note: resnet50 without --weights trains from random init (no hub downloads here)", err=True)
    with distributed.process_group(cfg.device) as world:
        extra = None
        if with_corrections:  # fetched once, the same rows for every process
            extra = world.broadcast(_correction_rows(cfg, settings) if world.main else None)
        model_dir = run(cfg, extra, settings=settings)
    if not world.main:
        return
    manifest = json.loads((model_dir / "manifest.json").read_text())
    if register_model:
        from model.registry import register_candidate

        with connection(resolve_database_url(settings)) as conn:
            register_candidate(conn, model_dir, store_from_settings(settings), actor=getpass.getuser(),
                               reason=f"enrich train --preset {preset}")
    typer.echo(json.dumps({"model_dir": str(model_dir), "model_version": manifest["model_version"],
                           "metrics": manifest["metrics"]}, indent=2))


def _relaunch(ctx: typer.Context, nproc: int) -> None:
    """Run the `train` command being parsed again, in ``nproc`` processes under torchrun; exit with its status."""
    from training import distributed  # lazy: imports torch

    args: list[str] = []
    for p in ctx.command.params:  # the options as given, --nproc left out
        value = ctx.params.get(p.name or "")
        if p.name == "nproc" or value is None or value == p.default:
            continue
        if getattr(p, "is_flag", False):  # an --x/--no-x switch: the one given
            args += (p.opts if value else p.secondary_opts)[:1]
        else:
            args += [p.opts[0], str(value)]
    code = subprocess.call(distributed.torchrun_command(nproc, "training.launch", args))
    if code:
        raise typer.Exit(code)


def evaluate(
    model_dir: Path = typer.Argument(..., help="model directory (manifest.json + model.safetensors)."),
    data_dir: Path = typer.Option(None, help="the dataset's directory: Fashion-MNIST idx files, or the DeepFashion "
                                             "root with category/ and inshop/ (default: as the model was trained)."),
    test_items: int = typer.Option(None, help="FMNIST-shop: evaluate on this many test items, 0 for all 10 000 "
                                              "(default: as the model was trained)."),
    seed: int = typer.Option(None, help="FMNIST-shop: seed of the fixed evaluation set (default: as the model "
                                        "was trained)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:n] (default: auto)."),
    flip_tta: bool = typer.Option(None, "--flip-tta/--no-flip-tta", help="average each photo with its mirror "
                                  "image, or not (default: as the model was saved)."),
    mixed_precision: bool = typer.Option(True, "--mixed-precision/--fp32", help="predict as the worker does "
                                         "with ENRICH_MIXED_PRECISION on (bf16 on CPUs that have it, fp16 on "
                                         "CUDA), or in fp32 — to check a model loses nothing (default: mixed)."),
    output: Path = typer.Option(None, help="also write the metrics as JSON to this file (default: no)."),
) -> None:
    """Measure a saved model on the fixed evaluation set of the dataset it was trained for."""
    from training.eval_sets import EvalSetError, model_eval_config  # lazy: imports torch
    from training.evaluate import evaluate_model

    try:
        cfg = model_eval_config(model_dir, data_dir=data_dir, seed=seed, test_items=test_items or None)
        if test_items == 0:
            cfg = replace(cfg, test_items=None)
        result = evaluate_model(model_dir, cfg, device=device, flip_tta=flip_tta,
                                mixed_precision=mixed_precision, settings=get_settings())
    except EvalSetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{result.model_version}: {result.dataset}, taxonomy {result.taxonomy}, "
               f"evaluation set {result.eval_set}", err=True)
    text = json.dumps(result.metrics, indent=2)
    if output:
        output.write_text(text)
    typer.echo(text)


def promote(
    model: str = typer.Argument(..., help="a model directory to register and promote, or the model_version "
                                          "of a registered candidate."),
    reason: str = typer.Option("", "--reason", help="why (recorded with the gate's verdict; --force needs one; "
                                                    "default: none)."),
    by: str = typer.Option(None, "--by", help="who promotes (recorded; default: the login name)."),
    tolerance: float = typer.Option(None, min=0.0, max=1.0,
                                    help="allowed drop on each gate metric (and on each category, where above "
                                         "ENRICH_GATE_CLASS_MARGIN); one above ENRICH_GATE_TOLERANCE that lets a "
                                         "failing candidate through is recorded as an override (default: "
                                         "ENRICH_GATE_TOLERANCE, 0)."),
    force: bool = typer.Option(False, "--force", help="promote even when the gate fails or refuses; needs "
                                                      "--reason; recorded with who, why and the reasons "
                                                      "overridden (default: no)."),
    reevaluate: bool = typer.Option(False, help="re-measure candidate and active model on the fixed "
                                                "evaluation set instead of trusting stored metrics (default: no)."),
    require_shadow: int = typer.Option(None, "--require-shadow", min=1,
                                       help="also require the shadow figures: at least this many corrections "
                                            "since the shadow run, the candidate right at least as often as the "
                                            "active model (default: not required)."),
    backfill: bool = typer.Option(True, "--backfill/--no-backfill",
                                  help="after a promotion, enqueue the catalogue backfill (re-embed, re-tag, "
                                       "then reindex) on the backfill queue (default: on)."),
    database_url: DatabaseUrl = None,
    embedded: Embedded = False,
) -> None:
    """Promote a candidate through the gate (overall metrics, each category, held-out corrections against
    the active model); a candidate that fails is rejected, one not comparable stays a candidate."""
    from model.registry import BackfillNotSent, backfill_after, register_candidate
    from training import gate

    if force and not reason.strip():
        raise typer.BadParameter("a forced promotion needs --reason", param_hint="--reason")
    settings = get_settings()
    url = database_url or resolve_database_url(settings, embedded_ok=embedded)
    store = store_from_settings(settings)
    actor = by or getpass.getuser()
    with connection(url) as conn:
        path = Path(model)
        version = (register_candidate(conn, path, store, actor=actor, reason=reason).model_version
                   if path.is_dir() else model)
        try:
            decision = gate.promote(conn, version, settings, actor=actor, reason=reason, tolerance=tolerance,
                                    force=force, reevaluate=reevaluate, shadow_min_corrections=require_shadow,
                                    store=store)
        except LookupError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    _print_decision(decision)
    if not decision.promoted:
        raise typer.Exit(1)
    if backfill:
        try:
            sent = backfill_after(decision, settings)  # the same step as the console's promote button
        except BackfillNotSent as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        if sent:
            typer.echo(f"backfill of {decision.candidate} enqueued (enrich backfill --wait shows its progress)")


def _print_decision(decision: Decision) -> None:
    """What `enrich promote` says: the move, the gate's reasons (or what an override overrode) and notes."""
    verdict = decision.details.get("gate") or {}
    if verdict.get("measured") == "re-measured":
        typer.echo(f"measured on evaluation set {verdict['eval_sets'].get('candidate')}", err=True)
    if decision.promoted:
        typer.echo(f"promoted {decision.candidate} (previous active: {decision.previous or 'none'})")
    elif decision.status == "rejected":
        typer.echo(f"rejected {decision.candidate} (active: {decision.previous}); `enrich models unreject "
                   f"{decision.candidate} --reason …` puts it back")
    else:
        typer.echo(f"refused {decision.candidate} (active: {decision.previous}): not comparable, it stays a "
                   "candidate")
    forced = verdict.get("forced")
    if forced:
        typer.echo(f"  forced by {forced['by']} ({forced['why'] or 'no reason given'}) over the gate's verdict "
                   f"({forced['outcome']}):")
    for why in decision.reasons:
        typer.echo(f"  {why}")
    for note in verdict.get("notes", []):
        typer.echo(f"  note: {note}")


def retrain(
    reason: str = typer.Option(None, "--reason", help="Why (recorded with the job and the model it registers); "
                                                      "required to queue a job."),
    by: str = typer.Option(None, "--by", help="Who asks or cancels (recorded; default: the login name)."),
    preset: str = typer.Option(None, "--preset", help="training preset, as `enrich train --preset` (default: "
                                                      "ENRICH_RETRAIN_PRESET, quick)."),
    fresh: bool = typer.Option(False, "--fresh", help="train from fresh weights (default: start from the active "
                                                      "model's where its backbone and taxonomy fit the preset)."),
    wait: bool = typer.Option(False, "--wait", help="show the job's progress until it ends; exit 0 only when "
                                                    "its model was promoted, else 1 (failed, cancelled, skipped or "
                                                    "not promoted; the last line says which) (default: return once "
                                                    "it is queued)."),
    cancel: int = typer.Option(None, "--cancel", metavar="JOB", min=1,
                               help="cancel job JOB instead of queuing one: a queued job at once, a running one "
                                    "at its next training step; with --wait, follow it until it stops (exit 0 "
                                    "once cancelled) (default: none)."),
    database_url: DatabaseUrl = None,
    embedded: Embedded = False,
) -> None:
    """Enqueue a retraining job on the train queue: train with the corrections, evaluate, register, gate, then
    promote (ENRICH_AUTO_PROMOTE) or wait for an admin; one job runs at a time. `--cancel JOB` cancels one."""
    from core.celery_app import configure  # lazy: imports celery
    from training.jobs import cancel_job, request_retrain, retrain_params  # lazy: imports torch

    settings = get_settings()
    if cancel is None and not (reason or "").strip():
        raise typer.BadParameter("say why the job is needed (recorded with it and its model)", param_hint="--reason")
    conn = connect(database_url or resolve_database_url(settings, embedded_ok=embedded), autocommit=True)
    try:
        if cancel is not None:
            try:
                status = cancel_job(conn, cancel, by or getpass.getuser())
            except (LookupError, ValueError) as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from exc
            typer.echo(f"training job #{cancel} cancelled" if status == "cancelled" else
                       f"training job #{cancel} is running: cancel requested (it stops at its next training step)")
            if wait and _follow(conn, cancel, settings)["status"] != "cancelled":
                raise typer.Exit(1)
            return
        try:
            params = retrain_params(settings, preset, fresh)  # the same params as the console's retrain button
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--preset") from exc
        configure(settings)
        job_id = request_retrain(conn, requested_by=by or getpass.getuser(), reason=reason, params=params)
        typer.echo(f"training job #{job_id} queued on {settings.train_queue!r} (`enrich worker -Q "
                   f"{settings.train_queue}` runs it)")
        if not wait:
            return
        promoted, verdict = _verdict(conn, _follow(conn, job_id, settings))
    finally:
        conn.close()
    typer.echo(verdict)
    if not promoted:
        raise typer.Exit(1)


def _follow(conn: psycopg.Connection, job_id: int, settings: Settings) -> dict[str, Any]:
    """Print the job's line whenever it changes, until it ends (a job whose worker died ends failed once its
    heartbeat is older than ENRICH_JOB_STALE_S); returns its row."""
    from training.jobs import FINISHED, describe, get_job, reap_silent  # lazy: imports torch

    shown = None
    while True:
        reap_silent(conn, settings.job_stale_s)
        job = get_job(conn, job_id)
        if job is None:  # deleted while followed
            typer.echo(f"error: training job #{job_id} no longer exists", err=True)
            raise typer.Exit(1)
        line = describe(job, age=False)  # the age would change the line every second
        if line != shown:
            typer.echo(line)
            shown = line
        if job["status"] in FINISHED:
            return job
        time.sleep(1.0)


def _verdict(conn: psycopg.Connection, job: dict[str, Any]) -> tuple[bool, str]:
    """(whether the job's model is the active one now, the line saying so)."""
    from model.registry import active_version  # lazy: imports celery

    name = f"job #{job['id']}"
    if job["status"] == "done":
        if job["model_version"] and active_version(conn) == job["model_version"]:
            return True, f"promoted: {name}'s model {job['model_version']} is active"
        return False, f"not promoted: {name} is done but {job['model_version']} is not the active model"
    happened = {"failed": "failed", "cancelled": "was cancelled", "skipped": "was skipped"}[job["status"]]
    return False, f"not promoted: {name} {happened}"
