"""A local S3-compatible server for tests and `shardmerge bench object-store`: moto's server in a child process on
127.0.0.1 behind a small forwarding proxy that checks the access key (a request signed with another key is
refused with 403 InvalidAccessKeyId, as a real store refuses it) and can answer some requests with `503 SlowDown`
(throttling) to exercise the clients' retries. (moto's own signature check is not used: it rejects valid
signatures of listings whose prefix holds a "/".)

    with LocalS3() as s3:
        s3.env()          # AWS_ENDPOINT_URL, credentials and region for boto3 / shardmerge
        s3.client()       # a boto3 client
        s3.throttle(5)    # from now on every 5th request is answered 503 SlowDown
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_BAD_KEY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidAccessKeyId</Code>'
    b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>"
)
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: int, key_id: str):
        self.upstream, self.key_id = upstream, key_id
        self.every = 0  # 0: no throttling
        self.delay_s = 0.0  # added latency per request (slows a merge down for kill tests)
        self.count = 0
        self.throttled = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                line = self.rfile.readline()
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(n)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self) -> None:
        body = self._body()
        srv: _Proxy = self.server
        if srv.delay_s:
            time.sleep(srv.delay_s)
        with srv.lock:
            srv.count += 1
            throttle = srv.every and srv.count % srv.every == 0
            if throttle:
                srv.throttled += 1
        auth = self.headers.get("Authorization") or ""
        if f"Credential={srv.key_id}/" not in auth and f"X-Amz-Credential={srv.key_id}%2F" not in self.path:
            return self._error(403, _BAD_KEY)
        if throttle:
            return self._error(503, _SLOWDOWN)
        conn = http.client.HTTPConnection("127.0.0.1", srv.upstream, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", r.getheader("Content-Length") if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    def _error(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class LocalS3:
    """moto's S3 server (child process, authentication on) behind a throttling proxy, both on 127.0.0.1."""

    def __init__(self, region: str = "us-east-1"):
        self.region = region
        self.proc = None
        self.proxy = None

    def __enter__(self) -> LocalS3:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        port = _free_port()
        env = dict(os.environ, S3_IGNORE_SUBDOMAIN_BUCKETNAME="true")
        code = (
            "import sys, time\nfrom moto.server import ThreadedMotoServer\n"
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False)\ns.start()\n"
            "sys.stdin.read()\n"  # runs until the parent closes stdin (or dies)
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.upstream = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the local S3 server (moto) did not start; is moto[server] installed?") from None
                time.sleep(0.2)
        import secrets

        self.key_id = "SMTEST" + secrets.token_hex(7).upper()
        self.secret = secrets.token_urlsafe(30)
        self.proxy = _Proxy(port, self.key_id)
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.proxy.server_address[1]}"

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
            self.proxy = None
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def env(self) -> dict[str, str]:
        """Environment for a client of this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def throttle(self, every: int) -> None:
        """Answer every `every`-th request from now on with 503 SlowDown (0: stop)."""
        with self.proxy.lock:
            self.proxy.every, self.proxy.count, self.proxy.throttled = every, 0, 0

    def delay(self, seconds: float) -> None:
        """Add `seconds` of latency to every request from now on (0: none)."""
        self.proxy.delay_s = seconds

    @property
    def throttled(self) -> int:
        return self.proxy.throttled

    def upload_dir(self, local, bucket: str, prefix: str) -> str:
        """Upload every file of a local directory to s3://bucket/prefix/ (creating the bucket); returns the URL."""
        from pathlib import Path

        c = self.client()
        try:
            c.create_bucket(Bucket=bucket)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        root = Path(local)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                c.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root).as_posix()}")
        return f"s3://{bucket}/{prefix}"
