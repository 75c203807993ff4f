"""NGINX as a peer: what a user would build in front of the vendor without the gateway.

One ``nginx`` (one worker, like one gateway replica) with two servers in front of the same
stand-in upstream (``bench.sim``, which signs what NGINX cannot, see there):

- ``cache``: ``proxy_cache`` keyed by URI and body (POST cached), ``proxy_cache_lock`` so
  identical misses wait for one upstream call: the hit and the identical-storm peer;
- ``limit``: the same, behind ``limit_req`` (10 r/s, queued, not refused: ``burst``) and
  ``limit_conn`` 10 (the vendor's numbers as a user would write them): the miss-storm and
  burst peer.

Both log every request (``access_log`` buffered), as the gateway does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.support.processes import free_port, wait_for_port

_CONF = """
%(user)s
worker_processes 1;
daemon off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 8192; }
http {
  client_body_temp_path %(dir)s/body;
  proxy_temp_path %(dir)s/proxy;
  fastcgi_temp_path %(dir)s/fastcgi;
  uwsgi_temp_path %(dir)s/uwsgi;
  scgi_temp_path %(dir)s/scgi;
  access_log %(dir)s/access.log combined buffer=64k flush=1s;
  keepalive_requests 1000000;
  proxy_cache_path %(dir)s/cache levels=1:2 keys_zone=answers:32m max_size=1g inactive=1h
                   use_temp_path=off;
  limit_req_zone $server_port zone=vendor_rate:1m rate=10r/s;
  limit_conn_zone $server_port zone=vendor_conns:1m;
  upstream vendor { server 127.0.0.1:%(upstream)d; keepalive 32; }

  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header X-Bench-Unsigned 1;
  proxy_cache answers;
  proxy_cache_methods POST;
  proxy_cache_key "$server_port|$request_uri|$request_body";
  add_header X-Cache $upstream_cache_status;
  proxy_cache_valid 200 1h;
  proxy_cache_lock on;
  proxy_cache_lock_timeout 120s;
  proxy_cache_lock_age 120s;
  proxy_read_timeout 300s;
  client_body_buffer_size 64k;

  server {
    listen 127.0.0.1:%(cache_port)d;
    location / { proxy_pass http://vendor; }
  }
  server {
    listen 127.0.0.1:%(limit_port)d;
    location / {
      limit_req zone=vendor_rate burst=100000;
      limit_conn vendor_conns 10;
      proxy_pass http://vendor;
    }
  }
}
"""


def available() -> str | None:
    """The nginx binary on PATH (or Debian's /usr/sbin), or None: the peer is skipped."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def version() -> str:
    binary = available()
    if binary is None:
        return ""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)  # noqa: S603
    return out.stderr.strip().rpartition("/")[2]


class Nginx:
    """A private nginx on two free ports in front of ``upstream_port``; ``stop`` ends it."""

    def __init__(self, upstream_port: int, cpus: set[int] | None = None) -> None:
        binary = available()
        if binary is None:
            raise RuntimeError("nginx is not on PATH")
        self.dir = tempfile.mkdtemp(prefix="gw-bench-nginx-")
        self.cache_port, self.limit_port = free_port(), free_port()
        conf = Path(self.dir) / "nginx.conf"
        conf.write_text(
            _CONF
            % {
                # as root, workers would run as nobody and could not write the private dirs
                "user": "user root;" if os.geteuid() == 0 else "",
                "dir": self.dir,
                "upstream": upstream_port,
                "cache_port": self.cache_port,
                "limit_port": self.limit_port,
            }
        )
        cmd = [binary, "-p", self.dir, "-c", str(conf)]
        if cpus and shutil.which("taskset"):
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        self.proc = subprocess.Popen(  # noqa: S603 - nginx with a config written here
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_port(self.cache_port, timeout=20, proc=self.proc)
            wait_for_port(self.limit_port, timeout=20, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"nginx did not start: {self.error_log()}") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def error_log(self) -> str:
        path = Path(self.dir) / "error.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
