"""A real GCS JSON API for tests: `gcp-storage-emulator` on 127.0.0.1, reachable by TensorFlow's GCS file system.

TF's gs:// file system (tsl/platform/cloud/gcs_file_system.cc, used by `tf.io.gfile` and so by `etils.epath`)
has its endpoints compiled in (`https://www.googleapis.com/storage/v1`, `https://storage.googleapis.com`) and
reads no `STORAGE_EMULATOR_HOST` (that variable is honoured by google-cloud-storage and gcsfs only; TF's library
holds no such string, and no `GCS_*` variable sets the endpoint). What it does honour is libcurl's: `HTTPS_PROXY`
/ `HTTP_PROXY` / `NO_PROXY` and `CURL_CA_BUNDLE`, plus `GOOGLE_AUTH_TOKEN_FOR_TESTING` for credentials. So
the test starts two processes:

  * the emulator (`gcp_storage_emulator start --in-memory`), serving plain HTTP on 127.0.0.1, with one fix:
    an empty `uploadType=media` upload (TF's `makedirs` writes such `dir/` marker objects) crashes it (its request
    body is None, not b""), so `_emulator_main` makes that body b"" before the upload handler runs;
  * `_Handler` below, an HTTPS proxy that answers CONNECT for *.googleapis.com with a certificate signed by a CA
    made for the test (the CA file is `CURL_CA_BUNDLE`), reads each decrypted request and forwards it to the
    emulator with `Host` unchanged. The emulator builds the resumable-upload session URL from `Host` (`http://www.googleapis.com/...`),
    so those uploads come through this proxy too (`HTTP_PROXY`), which undoes curl's chunked transfer encoding
    (the emulator stores a chunked body as it is).

`GcsEmulator.env` holds the variables that point every GCS client of the stack there (in this process, if set
before its first gs:// call, and in launched subprocesses): TF through the proxy; google-cloud-storage (orbax asks
it whether a bucket has a hierarchical namespace) through `STORAGE_EMULATOR_HOST`; tensorstore (orbax's array
writes) through `TENSORSTORE_GCS_HTTP_URL`, straight to the emulator.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
  """(CA certificate, server certificate, server key) PEM files; the server certificate names HOSTS."""
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mote_jax test CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
  server = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
  paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
  paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
  paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
  return paths


class _Handler(http.server.BaseHTTPRequestHandler):
  """CONNECT -> TLS with the test certificate; every request (inside TLS or in absolute form) -> the emulator."""

  protocol_version = "HTTP/1.1"
  upstream: tuple[str, int]
  tls: ssl.SSLContext

  def log_message(self, *args):  # quiet
    pass

  def do_CONNECT(self):
    self.send_response(200, "Connection established")
    self.end_headers()
    self.wfile.flush()
    self.connection = self.tls.wrap_socket(self.connection, server_side=True)
    self.rfile = self.connection.makefile("rb", self.rbufsize)
    self.wfile = socketserver._SocketWriter(self.connection)
    self.close_connection = False

  def _forward(self):
    path = self.path
    if path.startswith(("http://", "https://")):  # absolute form (plain HTTP through the proxy)
      path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      body = b""
      while True:
        size = int(self.rfile.readline().split(b";")[0], 16)
        if size == 0:
          self.rfile.readline()
          break
        body += self.rfile.read(size)
        self.rfile.readline()
    else:
      body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ("expect", "transfer-encoding", "content-length", "proxy-connection",
                                    "connection")}
    if body or self.command in ("POST", "PUT", "PATCH"):
      headers["Content-Length"] = str(len(body))
    connection = http.client.HTTPConnection(*self.upstream, timeout=60)
    connection.request(self.command, path, body=body or None, headers=headers)
    response = connection.getresponse()
    data = response.read()
    sys.stderr.write(f"{time.time():.2f} {self.command} {path} -> {response.status}\n")
    self.send_response_only(response.status, response.reason)
    for k, v in response.getheaders():
      if k.lower() not in ("transfer-encoding", "content-length", "connection"):
        self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)
    self.wfile.flush()
    connection.close()

  do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward


def serve_proxy(port: int, upstream_port: int, cert: str, key: str) -> None:
  tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  tls.load_cert_chain(cert, key)
  handler = type("Handler", (_Handler,), {"upstream": ("127.0.0.1", upstream_port), "tls": tls})
  server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
  server.daemon_threads = True
  server.serve_forever()


class GcsEmulator:
  """The emulator and the proxy as child processes; `env` points TF's GCS file system at them."""

  def __init__(self, directory: Path, buckets=("bucket",)):
    directory.mkdir(parents=True, exist_ok=True)
    ca, cert, key = make_certificates(directory)
    self.port, proxy_port = _free_port(), _free_port()
    self._processes = [
        subprocess.Popen([sys.executable, __file__, "emulator", "start", "--host", "127.0.0.1",
                          "--port", str(self.port), "--in-memory", "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=open(directory / "emulator.log", "wb")),
        subprocess.Popen([sys.executable, __file__, "proxy", str(proxy_port), str(self.port), str(cert), str(key)],
                         stdout=subprocess.DEVNULL, stderr=open(directory / "proxy.log", "wb"))]
    self.endpoint = f"http://127.0.0.1:{self.port}"
    proxy = f"http://127.0.0.1:{proxy_port}"
    self.env = {"HTTPS_PROXY": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "http_proxy": proxy,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "CURL_CA_BUNDLE": str(ca), "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                "NO_GCE_CHECK": "true", "STORAGE_EMULATOR_HOST": self.endpoint,
                "TENSORSTORE_GCS_HTTP_URL": self.endpoint}
    deadline = time.time() + 30
    for port in (self.port, proxy_port):
      while True:
        try:
          socket.create_connection(("127.0.0.1", port), timeout=1).close()
          break
        except OSError:
          if time.time() > deadline:
            self.stop()
            raise RuntimeError(f"GCS emulator or proxy did not start; logs in {directory}")
          time.sleep(0.1)
    for bucket in buckets:
      self.create_bucket(bucket)

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
      assert response.status == 200, response.read()

  def _open(self, request):
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=60)

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    """One object, through the emulator's JSON API directly (not through TF)."""
    url = (f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
           + urllib.parse.quote(name, safe=""))
    with self._open(urllib.request.Request(url, data=data, method="POST",
                                           headers={"Content-Type": "application/octet-stream"})) as response:
      assert response.status == 200, response.read()

  def upload_tree(self, local: Path, uri: str) -> None:
    """Every file under the local directory `local` to `gs://bucket/prefix` (`uri`)."""
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    for path in sorted(Path(local).rglob("*")):
      if path.is_file():
        self.upload(bucket, f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}", path.read_bytes())

  def download(self, uri: str) -> bytes:
    """An object's bytes, through the emulator's JSON API directly."""
    bucket, _, name = uri[len("gs://"):].partition("/")
    url = f"{self.endpoint}/download/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    with self._open(url) as response:
      return response.read()

  def object_names(self, bucket: str) -> list[str]:
    """Names of the objects in `bucket`, asked of the emulator's JSON API directly (not through TF)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    names, token = [], None
    while True:
      url = f"{self.endpoint}/storage/v1/b/{bucket}/o" + (f"?pageToken={token}" if token else "")
      with opener.open(url, timeout=10) as response:
        page = json.loads(response.read())
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names

  def stop(self) -> None:
    for process in self._processes:
      process.terminate()
    for process in self._processes:
      try:
        process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        process.kill()


def _emulator_main(args: list[str]) -> None:
  from gcp_storage_emulator import __main__ as emulator
  from gcp_storage_emulator.handlers import objects
  media_upload = objects._media_upload

  def empty_safe_media_upload(request, response, storage):
    if request.data is None:  # an empty body
      request._data = b""
    return media_upload(request, response, storage)

  objects._media_upload = empty_safe_media_upload
  sys.exit(emulator.main(args))


if __name__ == "__main__":
  if sys.argv[1] == "emulator":
    _emulator_main(sys.argv[2:])
  else:
    serve_proxy(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
