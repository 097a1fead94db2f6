"""The overview: what is waiting (queue, pending, failed, review backlog per group) and what is served."""
from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request

from enrich.console.auth import User, current_user
from enrich.console.deps import connection, render

log = logging.getLogger(__name__)
router = APIRouter()


def _queue_depth(settings) -> int | None:
    from core.celery_app import queue_depth

    try:
        return queue_depth(settings.gpu_queue)
    except Exception:  # noqa: BLE001 - the page still shows everything else when the broker is down
        log.warning("broker not reachable for the queue depth", exc_info=True)
        return None


def overview_figures(conn) -> dict:
    status = dict(conn.execute("SELECT status, count(*) FROM listings GROUP BY status").fetchall())
    backlog = conn.execute("SELECT tag_group, count(*) FROM review_queue WHERE resolved_at IS NULL"
                           " GROUP BY tag_group ORDER BY count(*) DESC, tag_group").fetchall()
    active = conn.execute("SELECT model_version, promoted_at FROM models WHERE status = 'active'").fetchone()
    workers = conn.execute("SELECT worker, model_version, shadow_version, seen_at FROM worker_status"
                           " WHERE seen_at > now() - interval '10 minutes' ORDER BY worker").fetchall()
    corrections = conn.execute("SELECT count(*) FROM corrections WHERE received_at > now() - interval '1 day'"
                               ).fetchone()[0]
    return {"status": status, "backlog": backlog, "active": active, "workers": workers,
            "corrections_day": corrections}


@router.get("/")
def overview(request: Request, user: User = Depends(current_user)):
    with connection(request) as conn:
        figures = overview_figures(conn)
    return render(request, "overview.html", user=user, page="overview",
                  queue_depth=_queue_depth(request.app.state.settings), **figures)
