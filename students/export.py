"""ONNX export and onnxruntime sessions, checked against PyTorch.

Small functions over models, arrays and files; no stage or CLI code. Every file is written
atomically (``name.tmp`` then ``os.replace``), so a reader never sees a half-written model.

The ONNX graph has one input ``images`` (float32 NCHW, normalised like the training data) and one
output ``logits``, both with a dynamic first axis named ``batch``. Quantization lives in
`students/quantize.py`, latency in `students/latency.py`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch

from pipeline.core.atomic import write_bytes

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
_EXAMPLE_BATCH = 2  # an example batch of 1 would let the exporter specialise the batch axis to 1


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put `model` in eval mode for the block; restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """torch.export-based exporter with a named dynamic batch dimension; returns one in-memory proto."""
    batch = torch.export.Dim(BATCH_AXIS, min=1)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            verbose=False,
        )
    return program.model_proto


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """Legacy TorchScript exporter with `dynamic_axes` (the fallback)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            opset_version=opset,
            do_constant_folding=True,
        )
    return onnx.load_model_from_string(buffer.getvalue())


def export_onnx(
    model: torch.nn.Module, path: Path, input_shape: tuple[int, int, int], opset: int = 18
) -> dict[str, Any]:
    """Export `model` (eval mode, any memory format) to a single-file ONNX model at `path`.

    Tries the dynamo exporter first and falls back to the TorchScript one if it raises. Returns
    ``{"exporter": "dynamo" | "torchscript", "opset": ..., "dynamo_error": str | None}``.
    """
    path = Path(path)
    example = torch.randn(_EXAMPLE_BATCH, *input_shape, device=_model_device(model))
    dynamo_error: str | None = None
    with _eval_mode(model), torch.no_grad():
        try:
            proto = _export_dynamo(model, example, opset)
            onnx.checker.check_model(proto)
            exporter = "dynamo"
        except Exception as error:  # noqa: BLE001 - any exporter failure selects the fallback
            dynamo_error = f"{type(error).__name__}: {str(error)[:500]}"
            proto = _export_torchscript(model, example, opset)
            exporter = "torchscript"
            onnx.checker.check_model(proto)
    stripped = strip_debug_metadata(proto)
    write_bytes(path, proto.SerializeToString())
    return {"exporter": exporter, "opset": opset, "dynamo_error": dynamo_error, "debug_metadata_bytes_stripped": stripped}


def strip_debug_metadata(proto: onnx.ModelProto) -> int:
    """Drop the exporter's per-node debug metadata (Python stack traces, FX node names, module paths)
    in place; returns the bytes removed.

    The dynamo exporter attaches ~4 kB of it to every node. Inference never reads it, and it would ship
    the training machine's source paths inside the model; it was 0.24 MB of a 5.3 MB fp32 ShuffleNet
    and, carried over by quantization, 0.18 MB (10 %) of its 1.7 MB int8 file.
    """
    removed = 0
    for node in proto.graph.node:
        removed += sum(len(entry.key) + len(entry.value) for entry in node.metadata_props)
        del node.metadata_props[:]
    return removed


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def onnx_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """CPU session: `threads` intra-op threads (None: onnxruntime's default), 1 inter-op, sequential."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (float32, (N, C)) for float32 NCHW normalised `images`, run in batches."""
    name = session.get_inputs()[0].name
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32)
        outputs.append(session.run(None, {name: chunk})[0])
    if not outputs:
        return np.zeros((0, session.get_outputs()[0].shape[-1]), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)


def torch_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """PyTorch eval-mode logits (float32) for the same inputs as :func:`onnx_logits`."""
    device = _model_device(model)
    outputs = []
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32))
            outputs.append(model(chunk.to(device)).float().cpu().numpy())
    return np.concatenate(outputs)


def logit_agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Max |difference|, top-1 agreement and relative L2 error of `other` against `reference`."""
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    return {
        "max_abs_logit_diff": float(diff.max()) if diff.size else 0.0,
        "top1_agreement": float(np.mean(reference.argmax(1) == other.argmax(1))) if len(reference) else 1.0,
        "relative_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-12)),
    }


def compare_with_torch(model: torch.nn.Module, session: ort.InferenceSession, images: np.ndarray) -> dict[str, float]:
    """PyTorch (eval mode) vs the ONNX session on the same inputs: max abs logit diff, top-1 agreement."""
    return logit_agreement(torch_logits(model, images), onnx_logits(session, images))



def file_size_bytes(path: Path) -> int:
    """Size of a model file in bytes, including an external-data file ``<name>.data`` next to it."""
    path = Path(path)
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)
