"""Predictions for users: a checkpoint directory or an exported `.onnx` file, with the model's own
preprocessing (input size, mean, std, class names travel with it), on image files.

An ONNX file written by the export stage carries the checkpoint's meta.json in its
`metadata_props` (key `selftrain_meta`), so it needs nothing beside it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from augment import build_eval_transform
from pipeline.data.shards import decode_bytes
from pipeline.data.sources.folder import walk_files
from pipeline.engine.predict import load_model
from teachers.checkpoint import META, CheckpointMeta, check_trained_head

ONNX_META_KEY = "selftrain_meta"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class PredictError(ValueError):
    """A model or image cannot be used for prediction; the message names it."""


@dataclass
class Predictor:
    meta: CheckpointMeta
    logits_of: Callable[[np.ndarray], np.ndarray]  # float32 NCHW normalised -> logits
    source: str

    def preprocess(self, encoded: bytes) -> np.ndarray:
        """An image file's bytes, decoded as training decoded them (16-bit scaled, transparency on black)."""
        array = decode_bytes(encoded, "L" if self.meta.in_chans == 1 else "RGB")
        view = build_eval_transform(self.meta.input_size)(array).astype(np.float32) / 255.0
        mean, std = np.asarray(self.meta.mean, np.float32), np.asarray(self.meta.std, np.float32)
        return ((view - mean) / std).transpose(2, 0, 1)

    def top_k(self, batch: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        logits = self.logits_of(batch).astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        order = np.argsort(-probs, axis=1)[:, :k]
        return [[(self.meta.class_names[c], float(p[c])) for c in row] for row, p in zip(order, probs)]


def onnx_properties(path: Path) -> dict[str, str]:
    """The ONNX file's metadata properties (the export stage's meta.json, an int8 file's quantization)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError:
        raise PredictError(f"{path}: not a valid ONNX file (it does not parse as an ONNX model); "
                           "give an .onnx file written by the export stage") from None
    return {p.key: p.value for p in model.metadata_props}


def int8_cpu_note(props: dict[str, str], path: Path) -> str | None:
    """A warning when an int8 file quantized with full-range weights (for a CPU with VNNI, where it is ~0.2
    points more accurate) runs on a CPU without VNNI, where onnxruntime's u8s8 products can saturate."""
    from students.quantize import INT8_META_KEY, cpu_has_vnni

    try:
        reduce_range = json.loads(props[INT8_META_KEY])["reduce_range"]
    except (KeyError, ValueError, TypeError):
        return None  # not an int8 file of this pipeline, or one from before the key was written
    if reduce_range or cpu_has_vnni():
        return None
    return (f"{path} was quantized for a CPU with VNNI (full-range int8 weights); this CPU has none, so "
            "onnxruntime's int8 products may saturate and lose accuracy: export again on a CPU like this one "
            "(it then keeps reduce_range), or serve the fp32 .onnx")


def onnx_meta(path: Path, props: dict[str, str] | None = None) -> CheckpointMeta:
    props = onnx_properties(path) if props is None else props
    if ONNX_META_KEY not in props:
        raise PredictError(f"{path}: no '{ONNX_META_KEY}' metadata (input size, mean/std, classes); "
                           "export it with the pipeline's export stage")
    try:
        raw = json.loads(props[ONNX_META_KEY])
        raw.pop("weights_sha256", None)
        return CheckpointMeta(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"]),
                                 "class_names": tuple(raw["class_names"])})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PredictError(f"{path}: its '{ONNX_META_KEY}' metadata is damaged ({type(exc).__name__}: {exc}); "
                           "export the model again") from None


def _ort_load_errors() -> tuple[type[Exception], ...]:
    """What onnxruntime raises for a file it cannot load (its own classes derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented",
             "RuntimeException")
    return (RuntimeError, ValueError) + tuple(getattr(ort_state, n) for n in names if hasattr(ort_state, n))


def _check_onnx_shapes(session: object, meta: CheckpointMeta, path: Path) -> None:
    """The graph takes what its metadata says the images become (N x channels x size x size) and gives one
    logit per class name: a file whose metadata was copied from another model would fail on the first batch
    or label its outputs with the wrong names."""
    inputs, outputs = session.get_inputs(), session.get_outputs()  # type: ignore[attr-defined]
    expected = {1: meta.in_chans, 2: meta.input_size, 3: meta.input_size}
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    wrong = len(shape) != 4 or any(isinstance(shape[i], int) and shape[i] != size for i, size in expected.items())
    if wrong:
        takes = f"one input of shape {shape}" if shape else f"{len(inputs)} inputs"
        raise PredictError(f"{path}: the graph takes {takes}, and its '{ONNX_META_KEY}' metadata describes "
                           f"N x {meta.in_chans} x {meta.input_size} x {meta.input_size} images; "
                           "export the model again")
    width = list(outputs[0].shape)[-1] if outputs and outputs[0].shape else None
    if isinstance(width, int) and width != len(meta.class_names):
        raise PredictError(f"{path}: the graph gives {width} logits, and its '{ONNX_META_KEY}' metadata names "
                           f"{len(meta.class_names)} classes; export the model again")


def load_predictor(path: str | Path, threads: int | None = None) -> Predictor:
    path = Path(path)
    if path.suffix.lower() == ".onnx" and path.is_file():
        import onnxruntime as ort

        props = onnx_properties(path)
        meta = onnx_meta(path, props)
        note = int8_cpu_note(props, path)
        if note:
            print(f"selftrain: warning: {note}", file=sys.stderr)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except _ort_load_errors() as exc:
            raise PredictError(f"{path}: onnxruntime cannot load this ONNX model ({type(exc).__name__}: {exc})") \
                from None
        _check_onnx_shapes(session, meta, path)
        name = session.get_inputs()[0].name
        return Predictor(meta, lambda x: session.run(None, {name: x})[0], str(path))
    if path.is_dir() and (path / META).exists():
        model, meta = load_model(path)
        check_trained_head(meta, str(path))
        model.eval()

        def torch_logits(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).float().numpy()
        return Predictor(meta, torch_logits, str(path))
    if not path.exists():
        raise PredictError(f"{path} does not exist; give RUN/<stage>/checkpoint or an exported .onnx file")
    inside = path / "checkpoint"
    if path.is_dir() and (inside / META).exists():
        raise PredictError(f"{path}: not a checkpoint directory (no {META}); did you mean {inside}?")
    raise PredictError(f"{path}: not a checkpoint directory (with {META}) or an .onnx file")


def image_files(inputs: list[str]) -> list[Path]:
    """Files as given, and every image under a given directory (sorted; linked folders followed once)."""
    return find_images(inputs)[0]


def find_images(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """(images, other files): files as given, every file under a given directory with an image suffix, and the
    files there without one (skipped, and said so: a folder of .heic photos gave "no image files" alone)."""
    found: list[Path] = []
    others: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            found.append(path)
            continue
        for file in walk_files(path):
            (found if file.suffix.lower() in IMAGE_SUFFIXES else others).append(file)
    return found, others


def predict_files(predictor: Predictor, files: list[Path], k: int, batch_size: int = 64) -> Iterator[dict]:
    """{"image", "top"} for every readable image, each batch's as soon as it is done (a long run shows its
    results as it goes, and an interruption keeps them), and {"image", "error"} for an unreadable one, which
    does not stop the rest."""
    pending: list[tuple[Path, np.ndarray]] = []

    def finished() -> list[dict]:
        tops = predictor.top_k(np.stack([x for _, x in pending]), k)
        done = [{"image": str(f), "top": [{"class": c, "probability": round(p, 6)} for c, p in top]}
                for (f, _), top in zip(pending, tops)]
        pending.clear()
        return done

    for path in files:
        try:
            pending.append((path, predictor.preprocess(path.read_bytes())))
        except FileNotFoundError:
            yield {"image": str(path), "error": "image does not exist"}
            continue
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; each names this file, the rest go on
            yield {"image": str(path), "error": f"not a readable image ({type(exc).__name__}: {exc})"}
            continue
        if len(pending) == batch_size:
            yield from finished()
    if pending:
        yield from finished()
