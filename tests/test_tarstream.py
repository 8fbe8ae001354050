"""The fast tar reader agrees with tarfile on every header format and reports damage."""

import gzip
import io
import tarfile

import pytest

from pipeline.data.tarstream import TarDamaged, iter_members


def make_tar(path, members, fmt=tarfile.USTAR_FORMAT, compress=False):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return raw


MEMBERS = [("a/k1.png", b"x" * 700), ("a/k1.cls", b"3"), ("k2.png", b""), ("d" * 150 + "/k3.png", b"yz")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_formats_match_tarfile(tmp_path, fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else MEMBERS[:3]
    make_tar(tmp_path / "s.tar", members, fmt)
    assert list(iter_members(tmp_path / "s.tar")) == members


def test_compressed_shard_falls_back(tmp_path):
    make_tar(tmp_path / "s.tar.gz", MEMBERS[:3], compress=True)
    assert list(iter_members(tmp_path / "s.tar.gz")) == MEMBERS[:3]


def test_truncation_and_corruption_raise_after_good_members(tmp_path):
    raw = make_tar(tmp_path / "s.tar", MEMBERS[:3])
    (tmp_path / "t.tar").write_bytes(raw[:512 + 300])  # inside the first payload
    with pytest.raises(TarDamaged, match="ends inside"):
        list(iter_members(tmp_path / "t.tar"))
    corrupt = bytearray(raw)
    corrupt[1536 + 10] ^= 0xFF  # the second member header (first: 512 + 700 padded to 1024)
    (tmp_path / "c.tar").write_bytes(bytes(corrupt))
    got = []
    with pytest.raises(TarDamaged, match="checksum"):
        for member in iter_members(tmp_path / "c.tar"):
            got.append(member)
    assert got == MEMBERS[:1]
