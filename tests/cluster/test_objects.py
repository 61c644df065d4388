"""The object stores (a directory, S3 through moto's server) behave alike: put, get, ranges, copy, rename, delete."""

from __future__ import annotations

import secrets

import pytest

from ca2vdm.server.cluster.objects import LocalObjects, S3Objects, objects_from_url


@pytest.fixture(params=["local", "s3"])
def objects(request, tmp_path):
    if request.param == "local":
        return LocalObjects(tmp_path / "objects")
    url = request.getfixturevalue("s3_url")
    return S3Objects(f"{url}-{secrets.token_hex(4)}", create_bucket=True)  # a prefix of its own


def read(stream) -> bytes:
    return b"".join(stream.chunks)


def test_put_get_and_missing(objects, tmp_path):
    assert objects.get_bytes("a/missing.bin") is None and objects.size("a/missing.bin") is None
    assert not objects.exists("a/missing.bin") and objects.open("a/missing.bin") is None
    objects.delete("a/missing.bin")  # no error
    objects.put_bytes("a/x.bin", b"hello")
    assert objects.get_bytes("a/x.bin") == b"hello" and objects.size("a/x.bin") == 5 and objects.exists("a/x.bin")
    big = secrets.token_bytes(600_000)  # several chunks
    (tmp_path / "big").write_bytes(big)
    objects.put_file("b/big.bin", tmp_path / "big")
    stream = objects.open("b/big.bin")
    assert stream.size == len(big) and (stream.start, stream.end) == (0, len(big) - 1) and read(stream) == big


def test_ranges(objects):
    data = bytes(range(256)) * 4
    objects.put_bytes("r.bin", data)
    stream = objects.open("r.bin", 10, 19)
    assert (stream.size, stream.start, stream.end) == (1024, 10, 19) and read(stream) == data[10:20]
    stream = objects.open("r.bin", 1000)
    assert (stream.start, stream.end) == (1000, 1023) and read(stream) == data[1000:]
    stream = objects.open("r.bin", 0, 5000)  # an end past the object is clipped
    assert stream.end == 1023 and read(stream) == data


def test_copy_rename_delete(objects):
    objects.put_bytes("tmp/one", b"1")
    objects.copy("tmp/one", "final/two")
    assert objects.get_bytes("final/two") == b"1" and objects.exists("tmp/one")
    objects.rename("tmp/one", "final/three")
    assert objects.get_bytes("final/three") == b"1" and not objects.exists("tmp/one")
    objects.put_bytes("final/two", b"22")  # overwrite
    assert objects.get_bytes("final/two") == b"22"
    for key in ("final/two", "final/three"):
        objects.delete(key)
        assert not objects.exists(key)


def test_local_keys_stay_inside(tmp_path):
    objects = LocalObjects(tmp_path)
    for key in ("../escape", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ValueError):
            objects.put_bytes(key, b"x")
    objects.put_bytes("videos/x.mp4", b"x")  # the single server's layout under data_dir
    assert (tmp_path / "videos" / "x.mp4").read_bytes() == b"x"
    assert not [p for p in (tmp_path / "videos").iterdir() if p.name.startswith(".")]  # no temporary left


def test_urls(tmp_path, s3_url):
    assert isinstance(objects_from_url(tmp_path / "d"), LocalObjects)
    s3 = objects_from_url(s3_url, create_bucket=True)
    assert isinstance(s3, S3Objects) and (s3.bucket, s3.prefix) == ("ca2vdm-test", "jobs")
    S3Objects(s3_url, create_bucket=True)  # the bucket exists already: fine
    with pytest.raises(ValueError):
        S3Objects("s3:///nobucket")
