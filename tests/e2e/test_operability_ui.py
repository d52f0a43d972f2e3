"""The live pool page (``/debug`` on the metrics port) in a real headless Chromium, after real traffic
through Envoy: the DOM shows the endpoints and the request count, and the screenshot is a real,
non-blank picture of the expected size.

Chromium comes from Debian's ``chromium`` package (installed by .ci/run); the test skips, saying
so, only when no Chromium binary is installed.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import httpx
import pytest

from epp.stack.local import HOST, LocalStack
from epp.stack.tour import MODEL
from tests.e2e.conftest import SIM_ARGS

# Teardown stops EPP with SIGTERM: without a drain it exits at once instead of serving 30 s more.
NO_DRAIN = "--drain-timeout=0s"

WIDTH, HEIGHT = 1280, 800


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium is not installed: apt-get install -y chromium (.ci/run installs it)")


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={profile}", "--virtual-time-budget=4000", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def png_info(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, decompressed scanlines) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, width, height, idat = 8, 0, 0, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_png_reader_on_a_blank_image():
    raw = b"".join(b"\x00" + b"\xff\xff\xff" * 4 for _ in range(3))
    ihdr = struct.pack(">IIBBBBB", 4, 3, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    w, h, pixels = png_info(png)
    assert (w, h) == (4, 3) and len(set(pixels)) == 2  # blank: filter byte + white


def test_live_page_in_headless_chromium(tmp_path):
    binary = chromium()
    with LocalStack(pods=2, sim_args=SIM_ARGS, epp_args=[NO_DRAIN]) as stack, \
            httpx.Client(base_url=stack.url, timeout=30) as client:
        for i in range(6):
            r = client.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": f"page {i}"}]})
            assert r.status_code == 200

        stop = threading.Event()

        def background() -> None:  # some load while the page is open, so the picture shows it
            with httpx.Client(base_url=stack.url, timeout=30) as c:
                for i in range(50):
                    if stop.is_set():
                        return
                    c.post("/v1/chat/completions", json={
                        "model": MODEL, "max_tokens": 200, "messages": [{"role": "user", "content": f"bg {i}"}]})

        threads = [threading.Thread(target=background, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            url = f"http://{HOST}:{stack.metrics_port}/debug"
            dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
            shot = tmp_path / "pool.png"
            pic = run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}",
                               f"--window-size={WIDTH},{HEIGHT}", url)
        finally:
            stop.set()
            for t in threads:
                t.join(60)

        html = dom.stdout
        assert dom.returncode == 0 and "<title>EPP pool</title>" in html, dom.stderr[-2000:]
        for endpoint in stack.endpoints:  # one live row per endpoint, filled in by the page's script
            assert f'data-endpoint="{endpoint}"' in html, html[-3000:]
        count = re.search(r'id="decisions-total">(\d+)<', html)
        assert count and int(count.group(1)) >= 6, html[-3000:]
        state = re.search(r'id="state"[^>]*>([a-z]+)<', html)
        assert state and state.group(1) == "serving"
        rows = re.findall(r"<td>demo-model</td>", html)
        assert len(rows) >= 6  # recent decisions listed with their model

        assert pic.returncode == 0 and shot.exists(), pic.stderr[-2000:]
        data = shot.read_bytes()
        width, height, pixels = png_info(data)
        assert (width, height) == (WIDTH, HEIGHT)
        # A near-blank page (one word on the same background) is about 5 KB with ~120 distinct filtered byte
        # values; the pool page's text, bars and tables give ~80 KB and every byte value.
        assert len(set(pixels)) > 200, "the screenshot is (nearly) blank"
        assert len(data) > 30_000, f"the screenshot is suspiciously small ({len(data)} bytes)"
