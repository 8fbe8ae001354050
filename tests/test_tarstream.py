"""The fast tar reader agrees with tarfile on every header format and reports damage."""

import bz2
import gzip
import io
import lzma
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


def members_before(path, damage: str) -> list:
    """The members the reader gave before it raised TarDamaged matching `damage`."""
    got = []
    with pytest.raises(TarDamaged, match=damage):
        for member in iter_members(path):
            got.append(member)
    return got


MEMBERS = [("a/k1.png", b"x" * 700), ("a/k1.cls", b"3"), ("k2.png", b""), ("d" * 150 + "/k3.png", b"yz")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_formats_match_tarfile(tmp_path, fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else MEMBERS[:3]
    make_tar(tmp_path / "s.tar", members, fmt)
    assert list(iter_members(tmp_path / "s.tar")) == members


def test_compressed_shard_is_read(tmp_path):
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
    assert members_before(tmp_path / "c.tar", "checksum") == MEMBERS[:1]


def test_a_copy_cut_between_two_members_is_damaged_not_a_shorter_shard(tmp_path):
    """A partial copy often stops on a block boundary, between members: tarfile reads that as a whole
    archive; the reader wants tar's end-of-archive block, and keeps the members before the cut."""
    raw = make_tar(tmp_path / "s.tar", MEMBERS[:3])
    (tmp_path / "cut.tar").write_bytes(raw[:512 + 1024])  # the first member whole, then nothing
    assert members_before(tmp_path / "cut.tar", "without tar's end-of-archive block") == MEMBERS[:1]
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(TarDamaged, match="end-of-archive"):
        list(iter_members(tmp_path / "empty.tar"))


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_a_cut_compressed_shard_is_damaged(tmp_path, compress):
    """gzip/bzip2/xz: cut before the end-of-stream marker, even where the tar inside looks complete."""
    raw = make_tar(tmp_path / "s.tar", MEMBERS[:3])
    whole = compress(raw)
    (tmp_path / "s.tar.z").write_bytes(whole)
    assert list(iter_members(tmp_path / "s.tar.z")) == MEMBERS[:3]
    for cut in (len(whole) // 2, len(whole) - 4):  # in the members; in the end marker, after the tar's end block
        (tmp_path / "cut.tar.z").write_bytes(whole[:cut])
        with pytest.raises(TarDamaged, match="compressed stream is cut or corrupt"):
            list(iter_members(tmp_path / "cut.tar.z"))


def test_a_member_name_that_is_not_utf8_is_read_as_tarfile_reads_it(tmp_path):
    members = [("caf\udce9.png", b"x"), ("next.png", b"y")]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(raw.getvalue())
    with tarfile.open(tmp_path / "s.tar") as reference:
        assert [m.name for m in reference.getmembers()] == [name for name, _ in members]
    assert list(iter_members(tmp_path / "s.tar")) == members


def test_a_plain_tar_whose_first_name_reads_like_a_magic_number_is_plain(tmp_path):
    members = [("BZh9.png", b"x" * 30), ("BZh9.cls", b"1")]
    make_tar(tmp_path / "s.tar", members)
    assert list(iter_members(tmp_path / "s.tar")) == members


def test_a_read_that_fails_is_not_damage_but_a_bzip2_stream_that_is_corrupt_is(tmp_path):
    """An I/O error under the reader (a disk, a mount, the network) is the storage's fault: counting it as a
    truncated shard would drop the shard's images for good. bzip2's own OSError on bad data is damage."""
    from pipeline.data.tarstream import StreamReadError, iter_stream_members

    raw = make_tar(tmp_path / "s.tar", MEMBERS[:3])

    class FailsAfter(io.BytesIO):
        def read(self, size=-1):
            if size < 0 or self.tell() + size > 1024:  # the device fails past the first KiB
                raise OSError(5, "Input/output error")
            return super().read(size)

    for data in (raw, gzip.compress(raw, mtime=0)):
        with pytest.raises(StreamReadError, match="Input/output error"):
            list(iter_stream_members(FailsAfter(data + b"\0" * 4096)))
    corrupt = bytearray(bz2.compress(raw))
    corrupt[40:60] = b"\xff" * 20
    (tmp_path / "bad.tar.bz2").write_bytes(bytes(corrupt))
    with pytest.raises(TarDamaged, match="compressed stream is cut or corrupt"):
        list(iter_members(tmp_path / "bad.tar.bz2"))


def test_zeroed_bytes_inside_an_archive_are_damage_not_its_end(tmp_path):
    """A block of zeros where a header should be reads as tar's end-of-archive: the members after it were
    dropped without a word (96 of a shard's 100 images in the review's repro)."""
    raw = make_tar(tmp_path / "s.tar", MEMBERS)
    zeroed = bytearray(raw)
    zeroed[512 + 1024:512 + 1024 + 512] = bytes(512)  # the second member's header
    (tmp_path / "z.tar").write_bytes(bytes(zeroed))
    assert members_before(tmp_path / "z.tar", "a member header follows a zero block read as tar's end-of-archive") == MEMBERS[:1]
    (tmp_path / "two.tar").write_bytes(raw + raw)  # `cat a.tar b.tar`: the second archive was never read
    with pytest.raises(TarDamaged, match="a second archive appended"):
        list(iter_members(tmp_path / "two.tar"))
    assert list(iter_members(tmp_path / "s.tar")) == MEMBERS  # zero padding after the end block is fine
    index = bytes(range(1, 256)) * 40  # what pixz appends after the end block (its file index): not a member
    for name, data in (("indexed.tar", raw + index), ("indexed.tar.xz", lzma.compress(raw + index))):
        (tmp_path / name).write_bytes(data)
        assert list(iter_members(tmp_path / name)) == MEMBERS
