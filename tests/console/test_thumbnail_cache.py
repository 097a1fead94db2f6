"""Thumbnail refusals are remembered only under the settings that decided them, and only for a while: a change
of the allow-list or of ENRICH_ALLOW_LOCAL_PATHS takes effect at once, and a refused image is tried again
after REFUSAL_TTL_S. Through the console's own code and its served route, against one data directory."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
import time

from PIL import Image

from enrich.console.images import REFUSAL_TTL_S, make_thumbnail, thumbs_dir
from tests.console.conftest import sign_in
from tests.console.test_review import png, seed_listings


def _refusal(settings, uri: str):
    return thumbs_dir(settings) / f"{hashlib.sha256(uri.encode()).hexdigest()}.refused"


def test_a_local_path_refused_without_local_paths_is_served_once_they_are_allowed(browser, console_url,
                                                                                  console_settings, db, tmp_path):
    seed_listings(db, tmp_path, 1, prefix="T")
    uri = db.execute("SELECT event->'images'->>0 FROM listings WHERE listing_id = 'T000'").fetchone()[0]
    strict = console_settings.model_copy(update={"allow_local_paths": False})  # same data dir
    data, ok = make_thumbnail(uri, strict)
    assert not ok and "local paths disabled" in _refusal(strict, uri).read_text()
    assert make_thumbnail(uri, strict)[1] is False  # remembered under those rules

    # the console runs with allow_local_paths=True: the refusal made under other rules does not count
    page = sign_in(browser, console_url, "reviewer")
    res = page.request.get(f"{console_url}/img/T000/0")
    assert res.status == 200 and "x-thumbnail" not in res.headers
    assert Image.open(io.BytesIO(res.body())).format == "JPEG"


class _Photo(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        type(self).hits.append(self.path)
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 120, 40)).save(buf, "PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(buf.getvalue())))
        self.end_headers()
        self.wfile.write(buf.getvalue())

    def log_message(self, *args):
        pass


def test_adding_a_host_to_the_allow_list_takes_effect_at_once(console_settings):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Photo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Photo.hits = []
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}/p.png"
        closed = console_settings.model_copy(update={"allowed_hosts": [], "allow_private_networks": True})
        assert make_thumbnail(uri, closed)[1] is False and _Photo.hits == []  # refused unfetched
        assert "host not allowed" in _refusal(closed, uri).read_text()
        opened = closed.model_copy(update={"allowed_hosts": ["127.0.0.1"]})
        data, ok = make_thumbnail(uri, opened)
        assert ok and Image.open(io.BytesIO(data)).format == "JPEG" and _Photo.hits == ["/p.png"]
    finally:
        server.shutdown()


def test_a_refusal_expires(console_settings, tmp_path):
    later = tmp_path / "later.png"
    assert make_thumbnail(str(later), console_settings)[1] is False  # not there yet: refused
    png(later)
    assert make_thumbnail(str(later), console_settings)[1] is False  # the refusal is remembered a while
    refused = _refusal(console_settings, str(later))
    past = time.time() - REFUSAL_TTL_S - 1
    os.utime(refused, (past, past))
    assert make_thumbnail(str(later), console_settings)[1] is True  # then tried again
