"""The run configuration: typed, frozen, strict.

Every section is a frozen dataclass with its defaults and bounds; `pipeline/config/loading.py`
turns a YAML file plus `--set a.b=value` overrides into a `Config` (unknown keys, wrong types and
out-of-range values refused by `schema.from_dict` with the key path, and the file or `--set` named).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config.schema import bounds

DataSource = Literal["fashion-mnist", "folder", "shards", "webdataset"]


@dataclass(frozen=True)
class WebDatasetConfig:
    """Shards written by other tools, read in place (`data.source: webdataset`; nothing copied).

    Each split is a list of shard URLs as `webdataset.WebDataset` takes them: brace notation
    (`pool-{000000..000099}.tar`), local paths, `file://`, `pipe:CMD`, http(s) and the other
    schemes of `webdataset.gopen`.
    """

    labeled: tuple[str, ...] = ()
    unlabeled: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    holdout: tuple[str, ...] = ()
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")  # which member is the image (one a sample)
    label_key: str = "cls"  # "cls" (the class index or name as text) or "json:<field>" (a field of the json member)
    classes: tuple[str, ...] | None = None  # class names in index order; null: the indices found (0..max)
    classes_file: str | None = None  # or a text file, one class name per line

    def __post_init__(self) -> None:
        if self.label_key != "cls" and not (self.label_key.startswith("json:") and len(self.label_key) > 5):
            raise ValueError(f'label_key: {self.label_key!r} is neither "cls" nor "json:<field>"')
        if not self.image_keys:
            raise ValueError("image_keys: list at least one image member, e.g. [jpg, png]")
        if any(key != key.lower() or key.startswith(".") for key in self.image_keys):
            raise ValueError(f"image_keys: {list(self.image_keys)}: members are matched by lower-case "
                             "extension without the dot, e.g. jpg")
        if self.classes is not None and self.classes_file is not None:
            raise ValueError("classes: give either classes or classes_file, not both")


@dataclass(frozen=True)
class DataConfig:
    """Where labeled/unlabeled/test data comes from and how it is split."""

    source: DataSource = "fashion-mnist"
    # raw idx dir (fashion-mnist), image folder (folder) or an imported data dir (shards); unused by webdataset
    path: str | None = None
    labels_per_class: int = field(default=100, metadata=bounds(ge=1))
    holdout_per_class: int = field(default=0, metadata=bounds(ge=0))
    seed: int = field(default=0, metadata=bounds(ge=0))
    shard_size: int = field(default=5000, metadata=bounds(ge=1))
    # keep only this many (seeded) images of the unlabeled pool; null = all of it
    max_unlabeled: int | None = field(default=None, metadata=bounds(ge=1))
    # folder import only: fraction of each class kept aside as the test split
    test_fraction: float = field(default=0.2, metadata=bounds(gt=0, lt=1))
    # keep only these classes (names or indices as text), renumbered 0..k-1 in this order; null = all
    classes: tuple[str, ...] | None = None
    # with `classes`: the other classes' training images join the unlabeled pool, without labels
    out_of_domain_unlabeled: bool = False
    # source "webdataset": per-split shard URLs written by other tools, used in place
    webdataset: WebDatasetConfig | None = None


@dataclass(frozen=True)
class ModelConfig:
    """A timm model (or torchvision's ShuffleNet V2) and its noise (dropout before the head, stochastic depth)."""

    arch: str = "resnet18"
    input_size: int = field(default=32, metadata=bounds(ge=8))
    drop_rate: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    drop_path_rate: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    # where the weights start (pipeline/engine/init.py): null or "random"; a checkpoint directory
    # (model.safetensors + meta.json; other classes: a new head); a weights file (.safetensors, .pt, .pth,
    # .bin: a timm state dict; mismatched tensors are skipped and listed); "timm:NAME" (timm's published
    # weights, from the local cache only); "pretrain" / "ssl_pretrain" (this run's pretraining stages);
    # "teacher" (student stages: the round's teacher). A deeper model of the checkpoint's family
    # (resnet34 from resnet18) is grown from it (teachers/grow.py).
    init: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one training stage."""

    policy: str = "s1"
    epochs: int = field(default=80, metadata=bounds(ge=1))
    # total optimizer steps; when set it replaces `epochs` (an equal budget across `selftrain compare` arms)
    steps: int | None = field(default=None, metadata=bounds(ge=1))
    batch_size: int = field(default=128, metadata=bounds(ge=1))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.1, metadata=bounds(gt=0))
    weight_decay: float = field(default=5e-4, metadata=bounds(ge=0))
    momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))
    warmup_epochs: float = field(default=2.0, metadata=bounds(ge=0))
    label_smoothing: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    save_every_steps: int = field(default=200, metadata=bounds(ge=1))
    eval_batch_size: int = field(default=512, metadata=bounds(ge=1))
    # evaluate/export a moving average of the weights (pipeline/engine/ema.py); null = the last weights
    ema_decay: float | None = field(default=None, metadata=bounds(gt=0, lt=1))

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch

    def __post_init__(self) -> None:
        from augment import PolicyError, parse_policy

        try:
            parse_policy(self.policy)
        except PolicyError as exc:
            raise ValueError(f"policy: {exc}") from None


@dataclass(frozen=True)
class StageConfig:
    """A model and how to train it (teacher now, students later)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _student_stage() -> StageConfig:
    # an epoch here is a pass over the whole pseudo-labeled stream: far fewer, longer epochs
    return StageConfig(model=ModelConfig(drop_rate=0.3, drop_path_rate=0.1),
                       train=TrainConfig(policy="s4", epochs=5, warmup_epochs=0.2))


@dataclass(frozen=True)
class StudentConfig:
    """Noisy Student training: labeled batch B plus unlabeled batch r*B every step.

    One student epoch is one pass over the selected unlabeled stream (the sum of
    the plan's repeat counts) at `unlabeled_ratio * batch_size` images a step; the
    labeled set cycles alongside at `batch_size` a step.
    """

    model: ModelConfig = field(default_factory=lambda: _student_stage().model)
    train: TrainConfig = field(default_factory=lambda: _student_stage().train)
    unlabeled_ratio: int = field(default=2, metadata=bounds(ge=1))
    pseudo_weight: float = field(default=1.0, metadata=bounds(ge=0))  # a in L_h + a * L_p
    loss_balance: bool = False  # Zoph et al. 2020 running-average normalisation
    # 0: no student; round 1's pseudo-labels and selection still run (measured), and distill teaches from the teacher
    rounds: int = field(default=1, metadata=bounds(ge=0))
    # memory: the selected pool is decoded into RAM; streamed: read from the shards as training goes
    # (pipeline/data/pool_stream.py), shuffled in a buffer of `shuffle_buffer` images
    pool: Literal["memory", "streamed"] = "memory"
    shuffle_buffer: int = field(default=2000, metadata=bounds(ge=1))


@dataclass(frozen=True)
class PseudoLabelConfig:
    """The un-noised teacher labels the unlabeled shards (eval mode, eval transform)."""

    batch_size: int = field(default=500, metadata=bounds(ge=1))
    # above this many classes, sidecars keep only the top-k logits plus the log-sum-exp
    topk_above_classes: int = field(default=100, metadata=bounds(ge=2))
    topk: int = field(default=20, metadata=bounds(ge=1))


@dataclass(frozen=True)
class SelectConfig:
    """Noisy Student selection: confidence threshold, class balancing, label form."""

    min_confidence: float = field(default=0.3, metadata=bounds(ge=0, le=1))
    # target images per class after balancing; null = pool size / number of classes
    per_class: int | None = field(default=None, metadata=bounds(ge=1))
    labels: Literal["soft", "hard"] = "soft"
    temperature: float = field(default=1.0, metadata=bounds(gt=0))  # for soft labels, on top of calibration
    label_smoothing: float = field(default=0.0, metadata=bounds(ge=0, lt=1))  # for hard labels
    # fit temperature scaling on the holdout split (needs data.holdout_per_class > 0)
    calibrate: bool = False
    seed: int = field(default=0, metadata=bounds(ge=0))


def _distill_train() -> TrainConfig:
    # a pass is one pass over the unlabeled pool; pad-crop + flip view shared by teacher and student
    return TrainConfig(policy="s1", epochs=3, batch_size=224, optimizer="adamw", lr=0.004, weight_decay=0.05,
                       warmup_epochs=0.2, label_smoothing=0.0)


@dataclass(frozen=True)
class PruneConfig:
    """Structured L1 filter pruning of each distilled student (Li et al. 2016), fine-tuned with the KD loss."""

    enabled: bool = False
    target_macs: float = field(default=0.5, metadata=bounds(gt=0, lt=1))  # MACs after / before
    steps: int = field(default=2, metadata=bounds(ge=1))  # prune, fine-tune; repeated
    # KD steps after each pruning step, and their rate: 2 x 200 at lr 0.001 lost 2.5 points where
    # 2 x 600 at lr 0.002 (a distillation pass) lost none (README "Pruning")
    fine_tune_steps: int = field(default=600, metadata=bounds(ge=0))
    lr: float = field(default=0.002, metadata=bounds(gt=0))
    # keep every pruned layer's channel count a multiple of this (null: any count); onnxruntime's
    # blocked fp32 kernels need multiples of 8: unrounded, a pruned MobileNetV3 ran 0.37x as fast as
    # the unpruned one at batch 64; rounded to 8, 1.6x as fast (README)
    round_to: int | None = field(default=8, metadata=bounds(ge=1))


@dataclass(frozen=True)
class MutualConfig:
    """Deep mutual learning (Zhang et al. 2018, "learning together"): each distill student trains with a
    peer on the same views; each also distils from the other's predictions (detached), besides the teacher."""

    weight: float = field(default=0.0, metadata=bounds(ge=0))  # of T^2 * KL(peer_T || student_T); 0 = off
    # the peer (arch, drop rates, init): null = a second, independently initialised copy of the student;
    # its input size must be the student's (both see one view)
    peer: ModelConfig | None = None


@dataclass(frozen=True)
class ExportConfig:
    """ONNX fp32 + int8 of every distilled (and pruned) student and of the teacher, and the deployment table."""

    int8: bool = True
    calibration_images: int = field(default=300, metadata=bounds(ge=1))  # training images for int8 ranges
    # int8 top-1 agreement with fp32 on the other labeled training images below this: retried with
    # Percentile calibration, then rejected (a guard against a broken model, e.g. efficientnet_b0)
    int8_min_agreement: float = field(default=0.9, metadata=bounds(ge=0, le=1))
    latency_budget_ms: float = field(default=2.0, metadata=bounds(gt=0))  # best model at batch 1 under this
    repeats: int = field(default=30, metadata=bounds(ge=3))  # timed runs per latency figure (median)
    eval_images: int | None = field(default=None, metadata=bounds(ge=1))  # test images scored; null = all


@dataclass(frozen=True)
class DistillConfig:
    """Hinton KD of the final self-trained model into small students, one `distill_<arch>` stage each.

    Each step feeds `labeled_batch` labeled and `train.batch_size` unlabeled images through one
    augmented view; online, the teacher sees exactly that view (resized to its own input size, its
    own normalisation). Loss: alpha * CE(labels) + beta * T^2 * KL(teacher_T || student_T); unlabeled
    rows give the KD term only.
    """

    # one entry per student (arch, input_size, drop_rate, drop_path_rate, init), e.g. mobilenetv3_small_100
    # at 64 px: EfficientNet/MobileNet downsample 32x, so 32 px leaves a 1x1 map (README); empty: no stages
    students: tuple[ModelConfig, ...] = ()
    teacher: str | None = None  # null: the last self-training round; or a checkpoint directory
    # more checkpoint directories taught together with the teacher: the KD target is the mean of their
    # softened outputs, each model on the shared view at its own size (online only; README "ensemble teacher")
    ensemble: tuple[str, ...] = ()
    mode: Literal["online", "offline"] = "online"  # offline: logits from pseudo-label sidecars (clean view)
    temperature: float = field(default=1.0, metadata=bounds(gt=0))
    alpha: float = field(default=0.1, metadata=bounds(ge=0))
    beta: float = field(default=0.9, metadata=bounds(ge=0))
    hard: bool = False  # KD target is the teacher's argmax (CE) instead of its softened distribution
    mixup: float = field(default=0.0, metadata=bounds(ge=0))  # Beta(m, m) mixup of the shared view; 0 = off
    labeled_batch: int = field(default=32, metadata=bounds(ge=0))
    # memory: the unlabeled pool is decoded into RAM; streamed: read from the shards as training goes
    # (pipeline/data/pool_stream.py: every key once, shuffled in a buffer of `shuffle_buffer` images)
    pool: Literal["memory", "streamed"] = "memory"
    shuffle_buffer: int = field(default=2000, metadata=bounds(ge=1))
    train: TrainConfig = field(default_factory=_distill_train)
    mutual: MutualConfig = field(default_factory=MutualConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def given_checkpoints(self) -> list[tuple[str, str]]:
        """(config key, directory) of each teacher checkpoint named here, not made by this run."""
        named = [("distill.teacher", self.teacher)] if self.teacher else []
        return named + [(f"distill.ensemble[{i}]", member) for i, member in enumerate(self.ensemble)]

    def __post_init__(self) -> None:
        if any(not member for member in self.ensemble) or len(set(self.ensemble)) < len(self.ensemble):
            raise ValueError(f"ensemble {list(self.ensemble)}: each member a checkpoint directory, named once")
        if self.mode == "offline" and self.ensemble:
            raise ValueError("ensemble needs mode: online: offline teacher logits are the sidecars of one teacher")
        if self.mode == "offline" and self.mixup > 0:
            raise ValueError(f"mixup {self.mixup} needs mode: online: offline teacher logits are of the clean, "
                             "unmixed image, so a mixed view would be taught another image's target")
        seen: dict[tuple[str, int], int] = {}
        for i, student in enumerate(self.students):
            first = seen.setdefault((student.arch, student.input_size), i)
            if first != i:
                raise ValueError(f"students[{first}] and students[{i}] are both {student.arch} at {student.input_size} "
                                 "px: one stage (and directory) each; list an architecture and size once")
        peer = self.mutual.peer
        if self.mutual.weight > 0 and peer is not None:
            other = sorted({s.input_size for s in self.students} - {peer.input_size})
            if other:
                raise ValueError(f"mutual.peer.input_size {peer.input_size} differs from a student's {other[0]}: "
                                 "the peer and its student see one view, so their input sizes must match")


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised pretraining on another labeled data set: stage `pretrain`, used by `init: pretrain`.

    The model is the teacher's architecture and input size; the target stage re-initialises the head
    for its own classes. The source data is imported into RUN/pretrain_data (or read from `data.path`
    when `data.source: shards`); only its labeled split is trained on.
    """

    data: DataConfig | None = None  # null: no pretrain stage
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, warmup_epochs=1.0))


def _ssl_train() -> TrainConfig:
    # both SimCLR views are drawn from this policy; an epoch is one pass over the unlabeled pool
    return TrainConfig(policy="s4", epochs=10, batch_size=256, optimizer="adamw", lr=0.002, weight_decay=1e-4,
                       warmup_epochs=1.0, label_smoothing=0.0)


@dataclass(frozen=True)
class SSLPretrainConfig:
    """SimCLR (Chen et al. 2020) on the unlabeled pool: stage `ssl_pretrain`, used by `init: ssl_pretrain`.

    Two views of each image from `train.policy`, a 2-layer projection head on the pooled features,
    NT-Xent at `temperature`; the backbone is the teacher's architecture and input size.
    """

    enabled: bool = False
    train: TrainConfig = field(default_factory=_ssl_train)
    temperature: float = field(default=0.2, metadata=bounds(gt=0))
    projection_dim: int = field(default=64, metadata=bounds(ge=2))
    hidden_dim: int = field(default=256, metadata=bounds(ge=2))
    knn_k: int = field(default=20, metadata=bounds(ge=1))  # k-NN probe on labeled -> test features (reported)


DIST_TIMEOUT_MINUTES = 360
PEER_TIMEOUT_S = 300


@dataclass(frozen=True)
class RuntimeConfig:
    """How to use the hardware: none of this changes results on CPU except an explicit `mixed_precision` (a
    training stage records the precision it ran in and refuses to resume in another) and `compile` (in the
    last bits)."""

    workers: int = field(default=2, metadata=bounds(ge=0))
    channels_last: Literal["auto", "on", "off"] = "auto"
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    threads: int | None = field(default=None, metadata=bounds(ge=1))
    log_with: Literal["tensorboard"] | None = None
    progress: bool = True
    # torch.compile the model being trained, through accelerate's dynamo backend: "inductor" generates
    # kernels (GPU, or CPU with a C++ compiler; the first steps wait for compilation), "aot_eager" traces
    # without generating code (checks a model compiles); compiled kernels may change the last bits
    compile: Literal["no", "inductor", "aot_eager"] = "no"
    # several processes: how long one waits for the others (a stage only process 0 runs, such as a large import
    # or selection, must end within it); torch's default is 30 minutes
    dist_timeout_minutes: int = field(default=DIST_TIMEOUT_MINUTES, metadata=bounds(ge=1))
    # several processes: a process silent this long (killed, out of memory, its node lost) stops the others, which
    # NCCL would leave waiting for the whole dist_timeout (pipeline/engine/peer_watch.py)
    peer_timeout_s: int = field(default=PEER_TIMEOUT_S, metadata=bounds(ge=5))


@dataclass(frozen=True)
class Config:
    seed: int = field(default=0, metadata=bounds(ge=0))
    data: DataConfig = field(default_factory=DataConfig)
    teacher: StageConfig = field(default_factory=StageConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    ssl_pretrain: SSLPretrainConfig = field(default_factory=SSLPretrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
