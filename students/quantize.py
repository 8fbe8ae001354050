"""Static post-training int8 quantization with onnxruntime, and a bench helper comparing set-ups."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.core.atomic import write_bytes
from students.export import file_size_bytes, logit_agreement, onnx_logits, onnx_session
from students.latency import interleaved_onnx_latency
from students.qdq_compact import compact_qdq_model

INT8_META_KEY = "selftrain_int8"  # the int8 file's quantization settings, in its metadata_props

# --------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSetup:
    """One onnxruntime static-quantization configuration (see :data:`DEFAULT_QUANT`)."""

    quant_format: str = "QDQ"  # "QDQ" or "QOperator"
    per_channel: bool = True
    reduce_range: bool = True
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    calibrate_method: str = "MinMax"
    op_types_to_quantize: tuple[str, ...] | None = None  # None: every op onnxruntime can quantize
    exclude_depthwise: bool = False
    extra_options: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["op_types_to_quantize"] = list(self.op_types_to_quantize) if self.op_types_to_quantize else None
        out["extra_options"] = dict(self.extra_options)
        return out


DEFAULT_QUANT = QuantSetup()
"""Default: QDQ, per-channel int8 weights, uint8 activations, reduce_range, MinMax, every op.

Measured on this 2-core Xeon (Sapphire Rapids: AVX512-VNNI, AMX), onnxruntime 1.32, sessions
with 2 intra-op threads, other processes loading the machine (load 3-5), so timings are medians of
5 interleaved rounds (:func:`compare_quant_setups` order fp32, set-up, ...) x 30 runs; +-15 % noise.
Models trained briefly on Fashion-MNIST (resnet18 200 steps, mobilenetv3_small_100 300 steps,
batch 128, AdamW), accuracy on the 10k test images; efficientnet_lite0 latency only (random
weights). x = speed-up over fp32 ORT; "-acc" = accuracy points lost::

    model              input  setup            b1 ms (x)     b64 img/s (x)   acc -acc
    resnet18           32px   fp32             1.36          888             86.51
                              qdq_u8s8_rr      0.83 (1.63)   1338 (1.51)     86.15 0.36
                              qdq_u8s8 (no rr) 0.82 (1.66)   1495 (1.68)     86.16 0.35
                              qop_u8s8_rr      0.83 (1.64)   1341 (1.51)     86.15 0.36
                              qdq_s8s8_rr      7.61 (0.18)    323 (0.36)     86.15 0.36
    mobilenetv3_small  64px   fp32             0.61          2020            81.86
                              qdq_u8s8_rr      0.55 (1.11)   2222 (1.10)     80.86 1.00
                              qdq_u8s8 (no rr) 0.55 (1.11)   2142 (1.06)     81.11 0.75
                              qop_u8s8_rr      0.53 (1.15)   2175 (1.08)     80.86 1.00
                              conv/gemm only   0.62 (0.99)   1840 (0.91)     80.66 1.20
                              no depthwise     0.60 (1.01)   2073 (1.03)     80.86 1.00
                              percentile calib 0.56 (1.10)   2089 (1.03)     80.99 0.87
                              qdq_s8s8_rr      4.24 (0.14)    533 (0.26)     80.86 1.00
    efficientnet_lite0 64px   fp32             2.00          468
                              qdq_u8s8_rr      0.78 (2.58)   1053 (2.25)

Why this default: int8 activations (S8S8) are 3-7x *slower* than fp32 here (no fused s8s8
QLinearConv path); uint8 activations are the fast path. QOperator runs as fast as QDQ (the
CPU provider fuses DQ-Conv-Q into QLinearConv) and QDQ is the portable format. Restricting
quantization to Conv/MatMul/Gemm or leaving depthwise convs in float only adds Q/DQ pairs and is
slower on MobileNetV3. reduce_range=False is as fast and ~0.2 points better on this VNNI CPU;
reduce_range=True is kept because it is the safe choice on AVX2 CPUs without VNNI (where u8s8
products saturate). MobileNetV3-small at 64 px gains only ~1.1x: its hard-swish becomes
HardSigmoid (float, between DQ/Q) + QLinearMul, and Q/DQ + those ops take ~43 % of the int8 run
time (onnxruntime profiling), so ship its int8 model only if the measured speed-up is worth the
~1 point; ReLU/ReLU6 nets (resnet18, efficientnet_lite0) gain 1.5-2.6x.

Command (a scratch bench script, not in the repo: train briefly, :func:`export_onnx`, then)::

    rows = compare_quant_setups(work / "fp32.onnx", work, (1, S, S), calibration_256_train_images,
                                test_images_2000, labels, {name: QuantSetup(...), ...},
                                batch=64, repeats=30, rounds=3, threads=2)

and the latencies above re-run on the saved files with ``onnx_latency(onnx_session(f, 2),
(1, S, S), batch=64, repeats=30)`` in 5 interleaved rounds.
"""


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where u8s8 int8 dot products cannot saturate (AVX512-VNNI or AVX-VNNI), so full 8-bit
    weight range is safe; read from /proc/cpuinfo (False where it cannot be read)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni"))


def setup_for_this_cpu() -> QuantSetup:
    """DEFAULT_QUANT with reduce_range off on VNNI CPUs: as fast, ~0.2-0.25 points more accurate (above)."""
    return replace(DEFAULT_QUANT, reduce_range=not cpu_has_vnni())


class _ArrayReader(CalibrationDataReader):
    """Feeds `images` to the calibrator in batches under the model's input name."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int) -> None:
        self._batches = [
            np.ascontiguousarray(images[i:i + batch_size], dtype=np.float32)
            for i in range(0, len(images), batch_size)
        ]
        self._name = input_name
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._batches):
            return None
        self._index += 1
        return {self._name: self._batches[self._index - 1]}

    def rewind(self) -> None:
        self._index = 0


def depthwise_conv_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of depthwise Conv nodes (group > 1 and group == input channels of the weight's kernel)."""
    weights = {init.name: init for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = weights.get(node.input[1]) if len(node.input) > 1 else None
        # depthwise: one input channel per group (weight shape (C_out, 1, kh, kw)) and many groups
        if group > 1 and weight is not None and len(weight.dims) == 4 and weight.dims[1] == 1:
            names.append(node.name)
    return names


def equal_batches(images: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """(`images` trimmed, batch size) so that ceil(N / batch_size) batches all hold as many images.

    onnxruntime's histogram calibrators (Percentile, Entropy) stack per-batch results and fail on a
    short last batch; fewer images are dropped than there are batches (300 at 32: 10 x 30, none).
    """
    batches = -(-len(images) // batch_size)
    size = len(images) // batches
    return images[:batches * size], size


def _input_name(model: onnx.ModelProto) -> str:
    initializers = {init.name for init in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    calibration: np.ndarray,
    setup: QuantSetup = DEFAULT_QUANT,
    batch_size: int = 32,
    compact: bool = True,
) -> dict[str, Any]:
    """Static post-training int8 quantization of `fp32_path` into `int8_path` (written atomically).

    Runs ``quant_pre_process`` (shape inference + graph optimisation) first, then
    ``quantize_static`` with MinMax calibration over `calibration` (float32 NCHW, normalised like
    the model's inputs; a few hundred images) fed in batches of `batch_size`, then (`compact`)
    :func:`compact_qdq_model`, which leaves the outputs bit-identical. Returns the settings.
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration must be a non-empty (N, C, H, W) array, got {calibration.shape}")
    with tempfile.TemporaryDirectory(prefix="quant-") as work:
        prepared, quantized = Path(work) / "prepared.onnx", Path(work) / "quantized.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        model = onnx.load(str(prepared))
        exclude = depthwise_conv_nodes(model) if setup.exclude_depthwise else None
        calibration, batch_size = equal_batches(calibration, batch_size)
        reader = _ArrayReader(calibration, _input_name(model), batch_size)
        del model
        quantize_static(
            str(prepared),
            str(quantized),
            reader,
            quant_format=QuantFormat[setup.quant_format],
            op_types_to_quantize=list(setup.op_types_to_quantize) if setup.op_types_to_quantize else None,
            per_channel=setup.per_channel,
            reduce_range=setup.reduce_range,
            activation_type=QuantType[setup.activation_type],
            weight_type=QuantType[setup.weight_type],
            nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod[setup.calibrate_method],
            extra_options=dict(setup.extra_options) or None,
        )
        model = onnx.load(str(quantized))
        compacted = compact_qdq_model(model) if compact else None
        entry = model.metadata_props.add()  # `selftrain predict` warns where the file's CPU assumption fails
        entry.key, entry.value = INT8_META_KEY, json.dumps({"reduce_range": setup.reduce_range,
                                                            "activation_type": setup.activation_type,
                                                            "weight_type": setup.weight_type})
        onnx.checker.check_model(model)
        write_bytes(int8_path, model.SerializeToString())  # int8_path.tmp, fsync, os.replace
    return {
        **setup.as_dict(),
        "calibration_images": int(len(calibration)),
        "calibration_batch_size": int(batch_size),
        "excluded_nodes": len(exclude or []),
        "preprocessed": True,
        "compacted": compacted,
    }



def quantize_checked(
    fp32_path: Path,
    int8_path: Path,
    calibration: np.ndarray,
    check_images: np.ndarray,
    setup: QuantSetup,
    min_agreement: float,
) -> dict[str, Any]:
    """:func:`quantize_int8`, then top-1 agreement with the fp32 model on `check_images`.

    Below `min_agreement` it quantizes once more with Percentile calibration (MinMax lets one
    activation outlier stretch the uint8 range of a whole tensor); still below, the settings come
    back with ``rejected`` set and the caller must not ship `int8_path`. A guard against a broken
    model, not a quality target: efficientnet_b0 distilled on Fashion-MNIST agreed with its fp32
    model on 13 % of images after MinMax and 72 % after Percentile (README).
    """
    reference = onnx_logits(onnx_session(fp32_path), check_images).argmax(1)
    candidates = [setup] + ([replace(setup, calibrate_method="Percentile")] if setup.calibrate_method != "Percentile" else [])
    attempts: list[dict[str, Any]] = []
    for candidate in candidates:
        settings = quantize_int8(fp32_path, int8_path, calibration, candidate)
        predicted = onnx_logits(onnx_session(int8_path), check_images).argmax(1)
        attempts.append({"calibrate_method": candidate.calibrate_method,
                         "agreement_with_fp32": float(np.mean(predicted == reference))})
        if attempts[-1]["agreement_with_fp32"] >= min_agreement:
            break
    check = {"images": int(len(check_images)), "min_agreement": min_agreement, "attempts": attempts}
    best = max(attempts, key=lambda a: a["agreement_with_fp32"])
    if best["agreement_with_fp32"] < min_agreement:
        settings["rejected"] = (f"int8 agrees with fp32 on {100 * best['agreement_with_fp32']:.1f} % of {len(check_images)} "
                                f"training images (< {100 * min_agreement:.0f} %) after "
                                + " and ".join(a["calibrate_method"] for a in attempts) + " calibration")
    return {**settings, "check": check}


# --------------------------------------------------------------------------------------------
# Comparing quantization set-ups (bench helper, not used by tests)
# --------------------------------------------------------------------------------------------


def compare_quant_setups(
    fp32_path: Path,
    workdir: Path,
    input_shape: tuple[int, int, int],
    calibration: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray | None,
    setups: dict[str, QuantSetup],
    batch: int = 64,
    repeats: int = 30,
    rounds: int = 3,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """fp32 and each set-up: size, batch-1 latency, batch throughput, top-1 agreement (and accuracy).

    One row per model file, the fp32 row first. Latency: :func:`onnx_latency` on sessions with
    `threads` intra-op threads, taken in `rounds` interleaved rounds (fp32, set-up 1, ..., fp32, ...)
    and reduced by the median, so that load from other processes hits every model alike.
    """
    workdir = Path(workdir)
    rows: list[dict[str, Any]] = [{"setup": "fp32", "path": Path(fp32_path)}]
    for name, setup in setups.items():
        path = workdir / f"{name}.onnx"
        try:
            rows.append({"setup": name, "path": path, "settings": quantize_int8(fp32_path, path, calibration, setup)})
        except Exception as error:  # noqa: BLE001 - a set-up onnxruntime cannot build is reported
            rows.append({"setup": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
    runnable = [r for r in rows if "error" not in r]
    reference = onnx_logits(onnx_session(runnable[0]["path"]), images)
    for r in runnable:
        logits = onnx_logits(onnx_session(r["path"]), images)
        r.update({k: v for k, v in logit_agreement(reference, logits).items() if k != "max_abs_logit_diff"})
        if labels is not None:
            r["accuracy"] = float(np.mean(logits.argmax(1) == labels))
        r["size_bytes"] = file_size_bytes(r["path"])
    sessions = {r["setup"]: onnx_session(r["path"], threads) for r in runnable}
    latency = interleaved_onnx_latency(sessions, input_shape, batch, repeats, rounds)
    for r in runnable:
        r.update(latency[r["setup"]])
        r["path"] = str(r["path"])
    return rows
