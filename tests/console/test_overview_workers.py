"""The overview lists every worker process by role: its queues, and the model it serves (none on cpu and train
workers)."""
from __future__ import annotations

from tests.console.conftest import sign_in


def test_overview_lists_workers_with_their_queues_and_models(browser, console_url, db):
    db.execute("INSERT INTO worker_status (worker, queues, model_version, shadow_version, seen_at) VALUES"
               " ('gpu-host:11', 'gpu,backfill', 'test-v2', 'test-v3', now()),"
               " ('cpu-host:12', 'cpu', NULL, NULL, now()),"
               " ('gone-host:13', 'gpu', 'test-v1', NULL, now() - interval '1 hour')")
    page = sign_in(browser, console_url, "reviewer")
    rows = [[cell.inner_text().strip() for cell in row.query_selector_all("td")]
            for row in page.query_selector_all("table:has(th:text('queues')) tr:has(td)")]
    assert [r[:4] for r in rows] == [["cpu-host:12", "cpu", "no model", ""],
                                     ["gpu-host:11", "gpu,backfill", "test-v2", "test-v3"]]
