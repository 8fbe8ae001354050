"""`data.source: webdataset`: shards written by other tools (webdataset's TarWriter), used in place.

Sources: local paths with brace notation, `pipe:cat ...`, `file://` and http from a server on
127.0.0.1; `cls` and `json` labels; the manifest (nothing copied); duplicate shard names refused;
bad samples named; and a whole tiny pipeline whose sidecars are keyed by the shard basenames.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import TINY_TEACHER, set_args, synthetic_images
from pipeline.config.sections import DataConfig, WebDatasetConfig
from pipeline.data.imageset import load_labeled_split, load_unlabeled_split, open_data
from pipeline.data.shard_io import Fingerprint, as_location
from pipeline.data.shards import ReadProblems, ShardError, iter_shard
from pipeline.data.sources.fashion_mnist import DataSourceError
from pipeline.data.webdataset_source import import_webdataset, shard_lists, webdataset_section
from test_student import STUDENT

CLASSES = ["bag", "boot", "coat", "shirt"]


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_shard(path: Path, keys: list[str], labels: np.ndarray | None, seed: int, label: str = "cls",
                extra_image: set[str] = frozenset()) -> None:
    """Grayscale 28x28 images (png and jpg alternating) with `cls` or `json` labels, by webdataset's TarWriter."""
    images = synthetic_images(labels if labels is not None else np.arange(len(keys)) % len(CLASSES), 28, seed)
    with wds.TarWriter(str(path), encoder=False) as writer:
        for i, key in enumerate(keys):
            fmt = "PNG" if i % 2 == 0 else "JPEG"
            sample = {"__key__": key, fmt.lower().replace("jpeg", "jpg"): encode(images[i], fmt)}
            if key in extra_image:  # a second image member
                sample["png" if fmt == "JPEG" else "jpg"] = encode(images[i], "JPEG" if fmt == "PNG" else "PNG")
            if labels is not None and label == "cls":
                sample["cls"] = str(int(labels[i])).encode()
            elif labels is not None:
                sample["json"] = json.dumps({"label": CLASSES[int(labels[i])], "source": "other-tool"}).encode()
            writer.write(sample)


def write_split(directory: Path, prefix: str, per_shard: int, shards: int, seed: int, labeled: bool,
                label: str = "cls") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        labels = np.arange(per_shard) % len(CLASSES) if labeled else None
        write_shard(directory / f"{prefix}-{s:06d}.tar", [f"{prefix}{s}_{i:04d}" for i in range(per_shard)],
                    labels, seed + s, label)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """lab-00000{0,1} (2 x 32 labeled), test-000000 (40), pool-00000{0..2} (3 x 40 unlabeled), and the
    same labeled/test splits with json labels (class names) under json/."""
    root = tmp_path_factory.mktemp("foreign")
    write_split(root, "lab", 32, 2, 1, True)
    write_split(root, "test", 40, 1, 11, True)
    write_split(root, "pool", 40, 3, 21, False)
    write_split(root / "json", "lab", 32, 2, 1, True, label="json")
    write_split(root / "json", "test", 40, 1, 11, True, label="json")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def http_root(shard_dir) -> str:
    """http://127.0.0.1:PORT serving the shard directory from a thread."""
    handler = functools.partial(QuietHandler, directory=str(shard_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wds_config(shard_dir: Path, http_root: str, **changes) -> DataConfig:
    section = dict(labeled=(f"{shard_dir}/lab-{{000000..000001}}.tar",),
                   unlabeled=(f"pipe:cat {shard_dir}/pool-{{000000..000001}}.tar", f"{http_root}/pool-000002.tar"),
                   test=(f"file://{shard_dir}/test-000000.tar",))
    section.update(changes)
    return DataConfig(source="webdataset", webdataset=WebDatasetConfig(**section))


def test_urls_expand_and_every_source_streams_the_same_bytes(shard_dir, http_root):
    lists = shard_lists(wds_config(shard_dir, http_root).webdataset)
    assert [name for name, _ in lists["labeled"]] == ["lab-000000.tar", "lab-000001.tar"]
    assert [name for name, _ in lists["unlabeled"]] == ["pool-000000.tar", "pool-000001.tar", "pool-000002.tar"]
    assert lists["unlabeled"][0][1] == f"pipe:cat {shard_dir}/pool-000000.tar"
    assert lists["test"][0][1] == shard_dir / "test-000000.tar"  # file:// is read by the fast local reader
    assert lists["holdout"] == []
    local = shard_dir / "pool-000002.tar"
    expected = list(iter_shard(local))
    for url in (f"pipe:cat {local}", f"file://{local}", f"{http_root}/pool-000002.tar", str(local)):
        fingerprint = Fingerprint()
        assert list(iter_shard(as_location(url), fingerprint=fingerprint)) == expected, url
        assert (fingerprint.sha256, fingerprint.size) == (sha256(local), local.stat().st_size), url


def test_manifest_describes_the_shards_where_they_are(shard_dir, http_root, tmp_path):
    out = tmp_path / "data"
    manifest = import_webdataset(wds_config(shard_dir, http_root), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".selftrain-owned.json", "manifest.json"]  # nothing copied
    assert manifest["classes"] == ["0", "1", "2", "3"] and manifest["mode"] == "L"
    assert manifest["splits"]["labeled"]["count"] == 64 and manifest["splits"]["labeled"]["per_class"] == [16] * 4
    assert manifest["splits"]["test"]["count"] == 40 and manifest["splits"]["holdout"]["count"] == 0
    pool = manifest["splits"]["unlabeled"]
    assert pool["count"] == 120
    for record in pool["shards"]:
        local = shard_dir / record["name"]
        assert (record["count"], record["size"], record["sha256"]) == (40, local.stat().st_size, sha256(local))
    assert pool["shards"][2]["url"] == f"{http_root}/pool-000002.tar"
    info = open_data(out)
    assert info.shard_paths("unlabeled")[0] == f"pipe:cat {shard_dir}/pool-000000.tar"
    assert info.shard_paths("labeled")[1] == shard_dir / "lab-000001.tar"
    labeled = load_labeled_split(info, "labeled")
    assert len(labeled) == 64 and labeled.images[0].shape == (28, 28, 1)
    np.testing.assert_array_equal(labeled.labels[:8], [0, 1, 2, 3, 0, 1, 2, 3])
    pool_images, problems = load_unlabeled_split(info)
    assert len(pool_images) == 120 and not problems.skipped and not problems.truncated


def test_remote_labeled_shard_is_verified_while_streaming(shard_dir, http_root, tmp_path):
    served = tmp_path / "served"
    write_split(served, "test", 40, 1, 11, True)
    config = wds_config(shard_dir, http_root, test=(f"pipe:cat {served}/test-000000.tar",))
    import_webdataset(config, tmp_path / "data", progress=False)
    info = open_data(tmp_path / "data")
    assert len(load_labeled_split(info, "test")) == 40
    write_shard(served / "test-000000.tar", [f"test0_{i:04d}" for i in range(40)], np.arange(40) % 4, seed=99)
    with pytest.raises(ShardError, match=r"test-000000.tar streamed \d+ bytes that do not match the sha256"):
        load_labeled_split(info, "test")


def test_json_labels_with_class_names(shard_dir, http_root, tmp_path):
    config = wds_config(shard_dir, http_root, labeled=(f"{shard_dir}/json/lab-{{000000..000001}}.tar",),
                        test=(f"{http_root}/json/test-000000.tar",), label_key="json:label",
                        classes_file=str(shard_dir / "classes.txt"))
    manifest = import_webdataset(config, tmp_path / "data", progress=False)
    assert manifest["classes"] == CLASSES and manifest["label_key"] == "json:label"
    assert manifest["splits"]["test"]["per_class"] == [10] * 4
    test = load_labeled_split(open_data(tmp_path / "data"), "test")
    np.testing.assert_array_equal(test.labels, np.arange(40) % 4)
    unnamed = wds_config(shard_dir, http_root, labeled=(f"{shard_dir}/json/lab-000000.tar",), label_key="json:label")
    with pytest.raises(ShardError, match="lab-000000.tar, key 'lab0_0000': label 'bag' is not a class index"):
        import_webdataset(unnamed, tmp_path / "other", progress=False)


def test_two_shards_with_one_name_are_refused(shard_dir, http_root, tmp_path, capsys):
    from pipeline.cli import main

    clash = f"{http_root}/pool-000000.tar"
    with pytest.raises(DataSourceError, match=f"two shards are named pool-000000.tar: pipe:cat {shard_dir}"
                                              f"/pool-000000.tar and {clash}"):
        shard_lists(wds_config(shard_dir, http_root,
                               unlabeled=(f"pipe:cat {shard_dir}/pool-000000.tar", clash)).webdataset)
    (tmp_path / "pool-000000").write_bytes((shard_dir / "pool-000001.tar").read_bytes())  # another shard
    with pytest.raises(DataSourceError, match="two shards named pool-000000.tar and pool-000000 share the sidecar "
                                              "name pool-000000"):  # the second overwrote the first's sidecar
        shard_lists(wds_config(shard_dir, http_root, unlabeled=(f"{shard_dir}/pool-000000.tar",
                                                                f"{tmp_path}/pool-000000")).webdataset)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: webdataset\n  webdataset:\n    labeled: ['{shard_dir}/lab-000000.tar']\n"
                      f"    unlabeled: ['{shard_dir}/pool-000000.tar', 'file://{shard_dir}/pool-000000.tar']\n"
                      f"    test: ['{shard_dir}/test-000000.tar']\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "run")]) == 2  # refused before any stage
    assert "two shards are named pool-000000.tar" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_labeled_sample_with_two_images_is_an_error_and_a_pool_one_is_skipped(shard_dir, http_root, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    write_shard(bad / "lab-000009.tar", ["a", "b", "c"], np.array([0, 1, 2]), 1, extra_image={"b"})
    config = wds_config(shard_dir, http_root, labeled=(f"pipe:cat {bad}/lab-000009.tar",))
    with pytest.raises(ShardError, match=r"shard pipe:cat \S+/lab-000009.tar, key 'b': 2 image members \(jpg, png\)"):
        import_webdataset(config, tmp_path / "d1", progress=False)
    write_shard(bad / "pool-000009.tar", ["a", "b", "c"], None, 1, extra_image={"b"})
    config = wds_config(shard_dir, http_root,
                        unlabeled=(f"{http_root}/pool-000002.tar", f"file://{bad}/pool-000009.tar"))
    manifest = import_webdataset(config, tmp_path / "d2", progress=False)
    assert manifest["splits"]["unlabeled"]["shards"][1]["count"] == 2
    skipped = manifest["unlabeled_problems"]["skipped"]
    assert [(s["shard"], s["key"]) for s in skipped] == [("pool-000009.tar", "b")]
    assert "2 image members" in skipped[0]["reason"]


def test_a_repeated_member_is_named_when_labeled_and_counted_when_not(tmp_path):
    shard = tmp_path / "x.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("k1.png", b"a"), ("k1.cls", b"0"), ("k1.cls", b"1"), ("k2.png", b"b")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for location in (shard, f"pipe:cat {shard}"):
        with pytest.raises(ShardError, match=r"x.tar, key 'k1': member '.cls' appears twice"):
            list(iter_shard(location))
        problems = ReadProblems()
        assert [s["__key__"] for s in iter_shard(location, on_error="skip", problems=problems)] == ["k2"]
        assert [(p["shard"], p["key"]) for p in problems.skipped] == [("x.tar", "k1")]


def test_pipeline_runs_on_shards_used_in_place(shard_dir, http_root, tmp_path):
    from pipeline.cli import main

    config = tmp_path / "wds.yaml"
    config.write_text(
        "seed: 0\ndata:\n  source: webdataset\n  webdataset:\n"
        f"    labeled: ['{shard_dir}/lab-{{000000..000001}}.tar']\n"
        f"    unlabeled: ['pipe:cat {shard_dir}/pool-{{000000..000001}}.tar', '{http_root}/pool-000002.tar']\n"
        f"    test: ['file://{shard_dir}/test-000000.tar']\n"
        "    image_keys: [jpg, jpeg, png, webp]\n    label_key: cls\n    classes: [bag, boot, coat, shirt]\n")
    run = tmp_path / "run"
    overrides = set_args(TINY_TEACHER + STUDENT + ["runtime.threads=1", "runtime.workers=0"])
    assert main(["run", str(config), "--run-dir", str(run)] + overrides) == 0
    for stage in ("data", "teacher", "pseudo_label_r1", "select_r1", "student_r1"):
        assert (run / stage / "DONE").exists(), stage
    assert (run / "data" / "manifest.json").exists() and not list(run.rglob("*.tar"))  # no shard was copied
    names = ["pool-000000", "pool-000001", "pool-000002"]
    assert sorted(p.name for p in (run / "pseudo_label_r1").glob("*.labels.npz")) == [f"{n}.labels.npz"
                                                                                       for n in names]
    assert sorted(p.name for p in (run / "select_r1").glob("*.plan.npz")) == [f"{n}.plan.npz" for n in names]
    labels = json.loads((run / "pseudo_label_r1" / "manifest.json").read_text())
    assert labels["num_labeled"] == 120 and labels["num_skipped"] == 0
    assert [s["source_shard"] for s in labels["sidecars"]] == [f"{n}.tar" for n in names]
    student = json.loads((run / "student_r1" / "metrics.json").read_text())
    assert "top1" in student
    assert main(["run", str(config), "--run-dir", str(run)] + overrides) == 0  # a rerun skips every stage
    assert json.loads((run / "data" / "wall_time.json").read_text())["invocations"] == 1


def write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members, in this order (as `tar cf` would write them)."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_an_empty_split_or_a_damaged_labeled_image_is_refused_by_the_data_stage(shard_dir, http_root, tmp_path):
    """Not after the teacher has trained (an empty test split crashed the metrics; a truncated labeled
    PNG stopped the teacher)."""
    write_members(tmp_path / "test-000009.tar", [])
    config = wds_config(shard_dir, http_root, test=(str(tmp_path / "test-000009.tar"),))
    with pytest.raises(DataSourceError, match=r"data.webdataset.test: no samples in its 1 shard\(s\) "
                                              r"\(test-000009.tar\); the test split needs images"):
        import_webdataset(config, tmp_path / "d1", progress=False)
    png = encode(np.zeros((28, 28), dtype=np.uint8), "PNG")
    write_members(tmp_path / "lab-000009.tar", [("a.png", png), ("a.cls", b"0"), ("b.png", png[:50]), ("b.cls", b"1")])
    config = wds_config(shard_dir, http_root, labeled=(str(tmp_path / "lab-000009.tar"),))
    with pytest.raises(ShardError, match=r"lab-000009.tar, key 'b': image does not decode"):
        import_webdataset(config, tmp_path / "d2", progress=False)
    assert not (tmp_path / "d2" / "manifest.json").exists()


def test_dotted_file_names_and_members_stored_apart_are_explained(shard_dir, http_root, tmp_path):
    png = encode(np.zeros((28, 28), dtype=np.uint8), "PNG")
    write_members(tmp_path / "lab-000007.tar", [("cam.2024-01-01.png", png), ("cam.2024-01-01.cls", b"0")])
    config = wds_config(shard_dir, http_root, labeled=(str(tmp_path / "lab-000007.tar"),))
    with pytest.raises(ShardError, match=r"key 'cam': no image member .* webdataset splits a file name at its first "
                                         r"dot, so 'cam.2024-01-01.cls' is read as that key's member '2024-01-01.cls'"):
        import_webdataset(config, tmp_path / "d1", progress=False)
    write_members(tmp_path / "lab-000008.tar", [("a.png", png), ("b.png", png), ("a.cls", b"0"), ("b.cls", b"1")])
    config = wds_config(shard_dir, http_root, labeled=(str(tmp_path / "lab-000008.tar"),))
    with pytest.raises(ShardError, match=r"key 'a': missing 'cls' .* this sample's files are not next to each other"):
        import_webdataset(config, tmp_path / "d2", progress=False)
    write_members(tmp_path / "lab-000009.tar", [("a.png", png), ("a.txt", b"0")])  # a label the pipeline does not read
    config = wds_config(shard_dir, http_root, labeled=(str(tmp_path / "lab-000009.tar"),))
    with pytest.raises(ShardError, match=r"key 'a': missing 'cls' .* it has a 'txt' member: .* KEY.cls instead of KEY.txt"):
        import_webdataset(config, tmp_path / "d3", progress=False)


def test_a_classes_file_with_a_byte_order_mark(shard_dir, http_root, tmp_path):
    """Windows Notepad writes one; it is not part of the first class name."""
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(CLASSES).encode() + b"\r\n")
    config = wds_config(shard_dir, http_root, labeled=(f"{shard_dir}/json/lab-{{000000..000001}}.tar",),
                        test=(f"{shard_dir}/json/test-000000.tar",), label_key="json:label",
                        classes_file=str(classes))
    assert import_webdataset(config, tmp_path / "data", progress=False)["classes"] == CLASSES


def test_class_names_that_read_as_numbers(shard_dir, http_root, tmp_path):
    """'10', '20', '30' are names (no index that large); '1', '2', '3' would make a label '1' either the
    name at position 0 or the index 1: refused, never guessed."""
    png = encode(np.zeros((28, 28), dtype=np.uint8), "PNG")
    for shard, names in (("lab-000005.tar", ["10", "30", "20", "10"]), ("test-000005.tar", ["20", "30"])):
        write_members(tmp_path / shard, [m for i, name in enumerate(names)
                                         for m in ((f"s{i}.png", png), (f"s{i}.cls", name.encode()))])
    config = wds_config(shard_dir, http_root, labeled=(str(tmp_path / "lab-000005.tar"),),
                        test=(f"file://{tmp_path}/test-000005.tar",), classes=("10", "20", "30"))
    manifest = import_webdataset(config, tmp_path / "data", progress=False)
    assert manifest["splits"]["labeled"]["per_class"] == [2, 1, 1]
    np.testing.assert_array_equal(load_labeled_split(open_data(tmp_path / "data"), "labeled").labels, [0, 2, 1, 0])
    ambiguous = wds_config(shard_dir, http_root, classes=("1", "2", "3"))
    with pytest.raises(DataSourceError, match=r"the class name '1' \(position 0\) is also the class index 1"):
        import_webdataset(ambiguous, tmp_path / "other", progress=False)


def test_a_test_shard_in_another_split_is_refused(shard_dir, http_root, tmp_path):
    """Listed twice (a brace range over the pool that reaches the test shard), or copied under another name:
    the model would train on the images it is measured with."""
    test_shard = f"{shard_dir}/test-000000.tar"
    config = wds_config(shard_dir, http_root, unlabeled=(f"{shard_dir}/pool-{{000000..000001}}.tar", test_shard))
    with pytest.raises(DataSourceError, match=r"1 shard\(s\) listed in both test and unlabeled \(.*test-000000.tar\)"):
        import_webdataset(config, tmp_path / "d1", progress=False)
    (tmp_path / "pool-000009.tar").write_bytes(Path(test_shard).read_bytes())
    config = wds_config(shard_dir, http_root, unlabeled=(f"{shard_dir}/pool-000000.tar", str(tmp_path / "pool-000009.tar")))
    with pytest.raises(DataSourceError, match=r"with the same bytes \(sha256\) in both test and unlabeled "
                                              r"\(.*test-000000.tar in test and .*pool-000009.tar in unlabeled\)"):
        import_webdataset(config, tmp_path / "d2", progress=False)
    assert not (tmp_path / "d2" / "manifest.json").exists()


def test_labels_that_leave_a_class_without_images_are_refused_unless_classes_are_named(shard_dir, http_root, tmp_path):
    """1-based labels make class 0 empty; one stray '30' would make 26 empty classes."""
    png = encode(np.zeros((28, 28), dtype=np.uint8), "PNG")
    write_members(tmp_path / "lab-000006.tar", [m for i, label in enumerate("1223")
                                                for m in ((f"s{i}.png", png), (f"s{i}.cls", label.encode()))])
    config = wds_config(shard_dir, http_root, labeled=(str(tmp_path / "lab-000006.tar"),))
    with pytest.raises(DataSourceError, match=r"the labels found run 0..3, and class\(es\) 0 have no labeled image; "
                                              r"labels are class indices 0..N-1"):
        import_webdataset(config, tmp_path / "d1", progress=False)
    named = wds_config(shard_dir, http_root, labeled=(str(tmp_path / "lab-000006.tar"),), classes=tuple("abcd"))
    assert import_webdataset(named, tmp_path / "d2", progress=False)["splits"]["labeled"]["per_class"] == [0, 1, 2, 1]


def test_a_label_written_with_a_superscript_digit_is_named_not_a_traceback(shard_dir, http_root, tmp_path):
    png = encode(np.zeros((28, 28), dtype=np.uint8), "PNG")
    write_members(tmp_path / "lab-000004.tar", [("a.png", png), ("a.cls", "²".encode())])
    config = wds_config(shard_dir, http_root, labeled=(str(tmp_path / "lab-000004.tar"),))
    with pytest.raises(ShardError, match=r"lab-000004.tar, key 'a': label '²' is not a class index"):
        import_webdataset(config, tmp_path / "d1", progress=False)


def test_a_killed_scan_resumes_shard_by_shard(shard_dir, http_root, tmp_path, monkeypatch):
    """DESIGN §7: a kill redoes at most the shard in flight; the data stage read every shard again."""
    import pipeline.data.webdataset_source as source

    config = wds_config(shard_dir, http_root)
    whole = import_webdataset(config, tmp_path / "whole", progress=False)
    scanned: list[str] = []
    real = source.scan_unlabeled

    def killed_at_the_second_pool_shard(name, location, cfg):
        if len(scanned) == 1:
            raise KeyboardInterrupt
        scanned.append(name)
        return real(name, location, cfg)
    monkeypatch.setattr(source, "scan_unlabeled", killed_at_the_second_pool_shard)
    with pytest.raises(KeyboardInterrupt):
        import_webdataset(config, tmp_path / "d", progress=False)
    assert (tmp_path / "d" / "scan.jsonl").exists() and not (tmp_path / "d" / "manifest.json").exists()
    read_again: list[str] = []
    monkeypatch.setattr(source, "scan_labeled", lambda *a: pytest.fail("a labeled shard was read again"))
    monkeypatch.setattr(source, "scan_unlabeled", lambda name, *a: read_again.append(name) or real(name, *a))
    assert import_webdataset(config, tmp_path / "d", progress=False) == whole
    assert scanned == ["pool-000000.tar"] and read_again == ["pool-000001.tar", "pool-000002.tar"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".selftrain-owned.json", "manifest.json"]


def test_a_refused_import_reads_a_fixed_stream_again(shard_dir, http_root, tmp_path):
    """After a refusal the user rewrites the shard; a stream under the same URL was taken from the scan
    journal (nothing can tell it changed) and refused again."""
    png = encode(np.zeros((28, 28), dtype=np.uint8), "PNG")

    def write(labels: str) -> None:
        write_members(tmp_path / "lab-000003.tar", [m for i, label in enumerate(labels)
                                                    for m in ((f"s{i}.png", png), (f"s{i}.cls", label.encode()))])
    write("1223")
    config = wds_config(shard_dir, http_root, labeled=(f"pipe:cat {tmp_path}/lab-000003.tar",))
    with pytest.raises(DataSourceError, match=r"class\(es\) 0 have no labeled image"):
        import_webdataset(config, tmp_path / "d", progress=False)
    write("0123")
    assert import_webdataset(config, tmp_path / "d", progress=False)["splits"]["labeled"]["per_class"] == [1, 1, 1, 1]


def test_a_shard_that_cannot_be_read_is_an_error_even_where_damage_is_counted(tmp_path):
    """A missing file, or a `pipe:` command that fails, is not a truncated shard: skip-and-count would record
    it as one, and its images would be gone from the pool after the storage came back."""
    from pipeline.data.shards import ShardUnavailable
    shard = tmp_path / "x.tar"
    for location in (shard, f"pipe:cat {shard}"):
        problems = ReadProblems()
        with pytest.raises(ShardUnavailable, match=r"x.tar could not be read after key '<start of shard>' .*"
                                                   r"not counted as damaged"):
            list(iter_shard(location, on_error="skip", problems=problems))
        assert not problems.truncated


def test_a_cap_or_filter_shards_used_in_place_cannot_honour_is_refused_and_the_class_file_counts_by_content(
        shard_dir, http_root, tmp_path):
    """max_unlabeled (and so --preset quick) was ignored while RUN/config.yaml recorded it; an edited classes_file
    left the import done, and the checkpoints kept the old names."""
    import dataclasses

    from pipeline.config.sections import Config
    from pipeline.core.rundir import RunDir
    from pipeline.stages.base import StageContext
    from pipeline.stages.data_import import inputs
    from pipeline.stages.graph import build_graph

    config = wds_config(shard_dir, http_root)
    with pytest.raises(DataSourceError, match=r"data.max_unlabeled is 10000, and shards used in place are used "
                                              r"whole; .*`--preset quick` sets it"):
        webdataset_section(dataclasses.replace(config, max_unlabeled=10000))
    with pytest.raises(DataSourceError, match="data.classes and data.out_of_domain_unlabeled filter an import"):
        webdataset_section(dataclasses.replace(config, out_of_domain_unlabeled=True))
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\nc\nd\n")
    data = dataclasses.replace(config, webdataset=dataclasses.replace(config.webdataset, classes_file=str(classes)))
    run = Config(data=data)
    ctx = StageContext(run, RunDir(tmp_path / "run"), None, build_graph(run))  # type: ignore[arg-type]
    before = inputs(ctx, ctx.graph.get("data"))
    classes.write_text("T-shirt\nTrouser\nPullover\nDress\n")
    assert inputs(ctx, ctx.graph.get("data"))["classes_file_sha256"] != before["classes_file_sha256"]
