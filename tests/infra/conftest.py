"""A local S3-compatible server (moto) for the storage tests: remote paths exercised for real, on 127.0.0.1."""
from __future__ import annotations

import os

import pytest

BUCKET = "probesweep-test"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """(a function prefix -> URI, the pyarrow filesystem) of a fresh bucket `BUCKET` on a local S3 server."""
    pytest.importorskip("moto.server", reason="the S3 test server: pip install -e '.[test]'")
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    previous = {k: os.environ.get(k) for k in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)  # set before Ray starts: its local workers inherit them
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True,
                                 region="us-east-1")
    fs.create_dir(BUCKET)
    yield (lambda prefix: f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http"), fs
    server.stop()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
