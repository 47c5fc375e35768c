"""A real S3-compatible server on 127.0.0.1 (moto's), for the tests and the demo.

It runs as its own process, so Ray workers, the driver and boto clients all talk to it over HTTP
exactly as they would to a bucket, and a busy driver cannot stall it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from pipeline.environment import variables_set

# moto accepts any credentials; botocore needs some to sign requests.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalS3:
    endpoint_url: str
    process: subprocess.Popen

    def environment(self) -> dict[str, str]:
        """Variables that point boto, s3fs and this pipeline at the server."""
        return {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}

    @contextmanager
    def as_environment(self) -> Iterator[None]:
        """Point this process (and a local Ray started inside) at the server, then put the variables back."""
        with variables_set(self.environment()):
            yield

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url,
            key=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            use_listings_cache=False,
        )

    def create_bucket(self, name: str) -> None:
        self.filesystem().mkdir(name)


def start_local_s3(port: int | None = None, startup_timeout: float = 30.0) -> LocalS3:
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **TEST_CREDENTIALS},
    )
    deadline = time.monotonic() + startup_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"the local S3 server exited with code {process.returncode} (is moto[server] installed?)"
            )
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"the local S3 server did not answer on {endpoint} within {startup_timeout:.0f} s"
                ) from None
            time.sleep(0.2)
    return LocalS3(endpoint_url=endpoint, process=process)


def stop_local_s3(server: LocalS3) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@contextmanager
def local_s3(port: int | None = None) -> Iterator[LocalS3]:
    server = start_local_s3(port)
    try:
        yield server
    finally:
        stop_local_s3(server)
