"""Fault 7: the image host (the S3 endpoint) goes down for longer than the first retries, then comes back
(a private moto: the shared one is never touched; it serves the same images again from its first request
after the restart, see tests/faults/s3_server.py).

Fetches fail as "unavailable" (transient): each task re-enqueues the affected listings with backoff (1, 2,
4, 8 s ... here). Nothing may be marked failed, and every listing is enriched once the host is back.
"""
from __future__ import annotations

import time

from tests.faults.cluster import count_enriched, mixed_listings, outcome, process_report, produce, wait_for, \
    wait_settled

N = 400
DOWN_S = 10  # the retries at +1, +2 and +4 s (7 s) all meet the outage


def test_image_host_down_then_back(make_stack, private_s3):
    stack = make_stack(s3=private_s3.url, max_queue_depth=4, retry_backoff_s=1, task_max_retries=8,
                       fetch_timeout_s=2)
    records, good, poison = mixed_listings("s3", N, stack.images)
    produce(stack.kafka, stack.topic, records)
    worker, consumer = stack.worker(), stack.consumer()
    wait_for(lambda: count_enriched(stack.pg_url) >= N // 4, 180, "a quarter enriched", [worker, consumer])
    private_s3.kill9()
    down_at = count_enriched(stack.pg_url)
    time.sleep(DOWN_S)
    private_s3.start()
    retries = worker.log.read_text().count("Retry in")
    print(f"image host down {DOWN_S}s with {down_at} enriched; {retries} task retries logged meanwhile")
    done = wait_settled(stack.pg_url, good, procs=[worker, consumer])
    out = outcome(stack.pg_url, good, "image host down", stack.kafka, stack.dlq_topic, poison)
    assert down_at < N, "the outage did not land mid-stream"
    assert retries >= 3, "the outage was not met by several retries"
    assert done and not out.problems(), out.report()
    assert worker.alive and consumer.alive, process_report([worker, consumer])
