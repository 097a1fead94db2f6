"""Training in several processes (DistributedDataParallel under torchrun, gloo on the CPU): each rank's share
of the batches, the 2-process run against the 1-process one with the same global batch, rank 0 alone writing,
the job launcher, and resuming from a stage checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from training.samplers import make_batch_sampler

TINY_STEPS = (3, 3, 3)  # the tiny preset's stages
TINY_BATCH = 16


def _shares(kind, world, seed=0, passes=2, **kw):
    """The batches each rank of ``world`` draws in ``passes`` passes, rank by rank."""
    out = []
    for rank in range(world):
        bs = make_batch_sampler(kind, num_classes=4, batch_size=8, m=2, generator=torch.Generator().manual_seed(seed),
                                rank=rank, world=world, **kw)
        out.append([b for _ in range(passes) for b in bs])
    return out


@pytest.mark.parametrize("kind", ["m_per_item", "balanced", "interleaved"])
def test_sharded_batches_are_disjoint_cover_the_global_batch_and_follow_the_seed(kind):
    items = np.repeat(np.arange(20), 3)  # 20 items × 3 photos
    labels = items % 4
    if kind == "interleaved":  # half the rows without an item id: retrieval and classification batches alternate
        items = np.where(np.arange(len(items)) < 30, -1, items)
    data = {"labels": labels, "item_ids": items}
    sampler = "balanced" if kind == "balanced" else "m_per_item"
    (whole,), (r0, r1) = _shares(sampler, 1, **data), _shares(sampler, 2, **data)
    assert len(r0) == len(r1) == len(whole) > 4
    for b, s0, s1 in zip(whole, r0, r1, strict=True):
        assert len(s0) == len(s1) == 4
        assert s0 + s1 == b  # together: the batch one process trains on
        if kind == "m_per_item":  # M-per-item runs stay whole on each rank, and no photo is on both
            assert not set(s0) & set(s1)
            for s in (s0, s1):
                assert set(Counter(items[s].tolist()).values()) == {2}
    # same seed → same global order, on a fresh sampler; another seed → another order
    assert _shares(sampler, 2, **data) == [r0, r1]
    assert _shares(sampler, 2, seed=1, **data)[0] != r0


def test_set_epoch_makes_a_pass_depend_on_seed_and_epoch_only():
    items = np.repeat(np.arange(20), 3)

    def sampler():
        return make_batch_sampler("m_per_item", labels=items % 4, item_ids=items, num_classes=4, batch_size=8, m=2,
                                  generator=torch.Generator().manual_seed(0), rank=1, world=2)

    a, b = sampler(), sampler()
    list(a), list(a)  # a has run two passes, b none
    a.set_epoch(5), b.set_epoch(5)
    fifth = list(a)
    assert list(b) == fifth
    b.set_epoch(6)
    assert list(b) != fifth


def test_a_share_must_hold_whole_runs_of_m_photos():
    items = np.repeat(np.arange(20), 4)
    with pytest.raises(ValueError, match="multiple of 16"):
        make_batch_sampler("m_per_item", labels=items % 4, item_ids=items, num_classes=4, batch_size=8, m=4,
                           rank=0, world=4)


# ---- real processes ------------------------------------------------------------------------------------

def _env(tmp_path, **extra) -> dict:
    # one intra-op thread per process: the CI machine has 2 cores for both ranks
    return {**os.environ, "OMP_NUM_THREADS": "1", "ENRICH_DATA_DIR": str(tmp_path / "data"), **extra}


def _enrich_train(tmp_path, out_dir, version, *args, env=None):
    cmd = [sys.executable, "-m", "enrich.cli", "train", "--preset", "tiny", "--device", "cpu",
           "--data-dir", str(env["ENRICH_FMNIST_DIR"]), "--out-dir", str(out_dir), "--model-version", version, *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def _report(model_dir) -> dict:
    return json.loads((model_dir / "report" / "metrics.json").read_text())


def _losses(model_dir) -> np.ndarray:
    return np.array([h["total"] for h in _report(model_dir)["history"] if "total" in h])


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_with_the_same_global_batch(tmp_path, fmnist_dir, db, pg_url):
    env = _env(tmp_path, ENRICH_DATABASE_URL=pg_url, ENRICH_FMNIST_DIR=str(fmnist_dir))
    _enrich_train(tmp_path, tmp_path / "one", "tiny-1proc", env=env)
    two = _enrich_train(tmp_path, tmp_path / "two", "tiny-2proc", "--nproc", "2", "--register", env=env)
    d1, d2 = tmp_path / "one" / "tiny-1proc", tmp_path / "two" / "tiny-2proc"

    # both ranks trained, through DDP; rank 0 alone wrote: one model directory, one JSON answer, one registry row
    assert "rank0" in two.stderr and "rank1" in two.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["tiny-2proc"]  # checkpoint removed at the end
    assert json.loads(two.stdout)["model_version"] == "tiny-2proc"
    assert db.execute("SELECT model_version FROM models").fetchall() == [("tiny-2proc",)]
    assert _report(d2)["config"]["processes"] == 2 and _report(d1)["config"]["processes"] == 1

    # the ranks trained on disjoint halves of the batches one process trains on: per rank, half of every
    # batch; together, each row exactly as often as the single process used it
    steps = sum(TINY_STEPS)
    used1, used2 = np.load(d1 / "report" / "rows_used.npz"), np.load(d2 / "report" / "rows_used.npz")
    assert sorted(used2.files) == ["rank0", "rank1"]
    assert used2["rank0"].sum() == used2["rank1"].sum() == steps * TINY_BATCH // 2
    assert not np.array_equal(used2["rank0"], used2["rank1"])
    np.testing.assert_array_equal(used2["rank0"] + used2["rank1"], used1["rank0"])

    # the same training within tolerance: the per-step global losses (ranks differ from one process only
    # in BatchNorm statistics and triplet mining over half a batch), and the test figures
    l1, l2 = _losses(d1), _losses(d2)
    assert len(l1) == len(l2) == steps
    rel = np.abs(l2 - l1) / l1
    print(f"\nper-step loss 1 proc {np.round(l1, 4).tolist()}\n              2 proc {np.round(l2, 4).tolist()}"
          f"\nmean |Δ|/loss {rel.mean():.3f}, max {rel.max():.3f}")
    assert rel.mean() < 0.15 and rel.max() < 0.3
    m1, m2 = _report(d1)["test"], _report(d2)["test"]
    for k in ("test/top1", "test/recall@1", "test/colour/accuracy"):
        print(f"{k}: 1 proc {m1[k]:.4f}, 2 proc {m2[k]:.4f}")
        assert abs(m1[k] - m2[k]) < 0.15


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_job_launcher_relays_rank0_progress_stops_on_cancel_and_a_run_resumes_on_two_ranks(tmp_path, fmnist_dir,
                                                                                          monkeypatch):
    """The retraining job's launcher: rank 0's progress reaches the job; what the job raises (a cancellation)
    stops every process. The stage checkpoint it leaves is where `enrich train --nproc 2 --resume` goes on."""
    from training.config import TINY
    from training.processes import train_processes
    from training.train import checkpoint_path

    out = tmp_path / "models"
    cfg = replace(TINY, out_dir=out, data_dir=fmnist_dir, model_version="tiny-resumed", device="cpu")
    seen = []

    def progress(update):
        seen.append(update)
        if update.get("stage") == "3-joint":
            raise _Stop("cancelled")

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(_Stop):
        train_processes(cfg, None, progress, nproc=2)
    stages = [u["stage"] for u in seen]
    assert stages == ["prepare", "1-retrieval", "2-classification", "3-joint"]  # rank 0's reports, once each
    ckpt = checkpoint_path(out, "tiny-resumed")
    assert ckpt.is_file() and not (out / "tiny-resumed").exists()
    before = torch.load(ckpt, weights_only=True)
    assert list(before["stage_metrics"]) == ["1-retrieval", "2-classification"]

    env = _env(tmp_path, ENRICH_FMNIST_DIR=str(fmnist_dir))
    res = _enrich_train(tmp_path, out, "tiny-resumed", "--nproc", "2", "--resume", str(ckpt), env=env)
    for rank in (0, 1):  # every rank loaded the checkpoint
        assert f"rank {rank} resumed tiny-resumed from {ckpt}" in res.stderr
    history = _report(out / "tiny-resumed")["history"]
    losses = [h for h in history if "total" in h]
    assert losses[:6] == [h for h in before["history"] if "total" in h]  # stages 1-2 as the checkpoint had them
    assert [h["stage"] for h in losses[6:]] == ["3-joint"] * TINY_STEPS[2]
    assert not ckpt.exists()
