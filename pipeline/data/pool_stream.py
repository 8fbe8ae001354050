"""The selected pseudo-labeled pool read as a stream (`student.pool: streamed`), never decoded into memory.

Each rank reads its share of the unlabeled shards that keep at least one image, in an order
drawn per (seed, epoch), joined by `__key__` with the round's sidecars (targets) and plans
(repeat counts; keys with 0 are dropped). A kept image enters a bounded shuffle buffer once per
copy; at the end of the rank's epoch the buffer is drained, so an epoch holds every copy exactly
once. Only the image member's encoded bytes are kept: no `cls` member, no truth file.

Distillation streams the whole unlabeled pool instead (`distill_shards`): no plan (every key once),
no targets online, the teacher's stored logits offline; a sample without an image member (or, offline,
without logits: pseudo-labeling skipped it) is skipped and counted. Image bytes that fail to decode
stop training with an error naming the key (decoding happens in the loader workers).

Reading and shuffling run in the main process (the batch sampler); DataLoader workers decode and
augment. Batches therefore do not depend on the worker count, and the stream position (epoch,
shard order index, samples read from the current shard, the buffer and pending copies as encoded
bytes, the RNG) is one snapshot per step, saved with the training state (`PoolPosition` in
`pool_stream_loader.py`, with the sampler, dataset and collation that make batches of it): a resume
re-reads the current shard's prefix and nothing else.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.core.rundir import RunDir
from pipeline.data.imageset import DataInfo
from pipeline.data.pool import LabelForm, PoolError
from pipeline.data.shard_io import ShardLocation
from pipeline.data.shards import ShardError, image_member, iter_shard
from teachers.sidecar import read_sidecar

LABELED, UNLABELED = 0, 1
PoolItem = tuple[str, str, bytes, np.ndarray | None]  # (key, image member, encoded bytes, target or None)
LOGITS = LabelForm("logits", 1.0, 0.0)  # targets are the sidecar's logits as stored (offline distillation)


@dataclass(frozen=True)
class PoolShard:
    name: str
    location: ShardLocation
    sidecar: Path | None  # None: no targets (online distillation)
    plan: Path | None  # None: every key once (distillation)
    kept: int  # keys with repeats > 0
    copies: int  # sum of repeats: positions in one epoch


def pool_shards(data: DataInfo, run: RunDir, labels_stage: str, select_stage: str) -> list[PoolShard]:
    """The unlabeled shards with at least one selected key; only the plans' repeat counts are read."""
    shards = []
    for record in data.shard_records("unlabeled"):
        name = record["name"]
        plan = run.plan_path(select_stage, name)
        repeats = np.load(plan)["repeats"]
        if int(repeats.sum()) > 0:
            shards.append(PoolShard(name, data.shard_path("unlabeled", name), run.sidecar_path(labels_stage, name),
                                    plan, int((repeats > 0).sum()), int(repeats.sum())))
    if not shards:
        raise PoolError(f"selection in {run.stage_dir(select_stage)} kept no unlabeled images; "
                        "lower select.min_confidence")
    return shards


def distill_shards(data: DataInfo, run: RunDir, labels_stage: str | None) -> list[PoolShard]:
    """Every unlabeled shard, every key once; `labels_stage` (offline distillation): its sidecars' logits."""
    return [PoolShard(r["name"], data.shard_path("unlabeled", r["name"]),
                      run.sidecar_path(labels_stage, r["name"]) if labels_stage else None, None,
                      int(r["count"]), int(r["count"])) for r in data.shard_records("unlabeled") if int(r["count"])]


class _ShardReader:
    """The selected samples of one shard, in shard order, with their targets and repeat counts.

    Without a plan (distillation) every key is taken once and an unreadable sample is skipped and
    counted; with one, a selected key that cannot be read is an error (the shard changed)."""

    def __init__(self, shard: PoolShard, form: LabelForm, image_keys: Sequence[str], skip: int):
        self.shard, self.image_keys = shard, tuple(image_keys)
        sidecar = read_sidecar(shard.sidecar) if shard.sidecar is not None else None
        self.targets = form.targets(sidecar) if sidecar is not None else None
        keys = [str(k) for k in sidecar.keys] if sidecar is not None else None
        self.rows = None if keys is None else {k: i for i, k in enumerate(keys)}
        if shard.plan is not None:
            plan = np.load(shard.plan)
            if [str(k) for k in plan["keys"]] != keys:
                raise PoolError(f"{shard.plan} does not match its sidecar's keys; rerun the select stage")
            self.repeats = plan["repeats"]
            self.wanted: dict[str, int] | None = {k: i for i, k in enumerate(keys) if self.repeats[i] > 0}
        else:
            self.repeats, self.wanted = None, None
        self.seen: set[str] = set()  # without a plan: a repeated key is taken once, as at labeling time
        self.unreadable: list[str] = []
        self.samples = iter_shard(shard.location, on_error="skip")
        self.samples_read = 0
        for _ in range(skip):  # resuming inside this shard: skip what was read, without decoding
            sample = next(self.samples, None)
            if sample is None:
                raise PoolError(f"{shard.location}: ended after {self.samples_read} samples while resuming at "
                                f"{skip}; the shard changed after labeling")
            self.samples_read += 1
            self._take(str(sample["__key__"]))

    def _take(self, key: str) -> int | None:
        """The key's row (its copies and target), or None when it is not (or no longer) wanted."""
        if self.wanted is not None:
            return self.wanted.pop(key, None)  # a repeated key is taken once, as at labeling time
        if key in self.seen:
            return None
        self.seen.add(key)
        if self.rows is None:
            return -1
        if key not in self.rows:  # pseudo-labeling skipped it (unreadable then): skipped and counted here
            self.unreadable.append(key)
            return None
        return self.rows[key]

    def next(self) -> tuple[PoolItem, int] | None:
        """The next selected sample and its copies, or None at the end of the shard."""
        for sample in self.samples:
            self.samples_read += 1
            key = str(sample["__key__"])
            row = self._take(key)
            if row is None:
                continue
            try:
                ext = image_member(sample, self.shard.location, self.image_keys)
            except ShardError:
                self.unreadable.append(key)
                continue
            target = None if self.targets is None else self.targets[row]
            return (key, ext, bytes(sample[ext]), target), 1 if self.repeats is None else int(self.repeats[row])
        missing = sorted(self.wanted or ()) + (self.unreadable if self.wanted is not None else [])
        if missing:
            raise PoolError(f"{self.shard.location}: {len(missing)} selected keys are no longer readable "
                            f"(e.g. '{missing[0]}'); the shard changed after labeling")
        return None


@dataclass
class StreamState:
    """Everything a resume needs; the open shard reader is rebuilt from `order_pos` and `samples_read`."""

    epoch: int = 0
    order_pos: int = 0  # index into this rank's shard order of `epoch`
    samples_read: int = 0  # samples read from the current shard
    draining: bool = False  # the epoch's shards are read; the buffer empties before the next epoch
    buffer: list[PoolItem] = field(default_factory=list)
    pending: PoolItem | None = None  # the last sample read, with copies still to enter the buffer
    pending_copies: int = 0


class PoolStream:
    """This rank's endless stream of (item, augmentation seed) over the selected pool."""

    def __init__(self, shards: Sequence[PoolShard], form: LabelForm, seed: int, buffer_size: int,
                 image_keys: Sequence[str], rank: int = 0, world: int = 1):
        if len(shards) < world:
            raise PoolError(f"{len(shards)} unlabeled shards hold images to stream, fewer than the {world} "
                            "processes that each stream whole shards; use pool: memory (student.pool, distill.pool)")
        self.shards, self.form, self.seed, self.buffer_size = list(shards), form, seed, buffer_size
        self.image_keys, self.rank, self.world = tuple(image_keys), rank, world
        self.state = StreamState()
        self.rng = random.Random(f"pool-stream:{seed}:{rank}")  # fast scalar draws; state is a plain tuple
        self._reader: _ShardReader | None = None
        self._orders: dict[int, np.ndarray] = {}
        self._skipped = 0  # samples skipped in finished shards since this stream was made (plan-free mode)
        self._epoch_items: int | None = None  # items read in an epoch this object started from its beginning
        if rank == 0 and world > 1:
            per_rank = [sum(self.shards[i].copies for i in self.order_of_rank(0, r)) for r in range(world)]
            if min(per_rank) != max(per_rank):
                warnings.warn(f"the streamed pool's shards give the {world} processes {per_rank} images in epoch 0 "
                              "while every process draws the same share a step: an epoch repeats some images and "
                              "misses others (pool: memory covers every image exactly)", stacklevel=2)

    @property
    def skipped(self) -> int:
        """Unreadable samples skipped since this stream was made (plan-free mode; a plan's are errors)."""
        return self._skipped + (len(self._reader.unreadable) if self._reader is not None else 0)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's shard indices for `epoch`: a permutation drawn from (seed, epoch), rank r takes r::W."""
        if epoch not in self._orders:
            self._orders = {epoch: self.order_of_rank(epoch, self.rank)}
        return self._orders[epoch]

    def order_of_rank(self, epoch: int, rank: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.shards))[rank::self.world]

    def _read(self) -> tuple[PoolItem, int] | None:
        st = self.state
        order = self.order(st.epoch)
        while st.order_pos < len(order):
            if self._reader is None:
                self._reader = _ShardReader(self.shards[order[st.order_pos]], self.form, self.image_keys,
                                            st.samples_read)
            found = self._reader.next()
            st.samples_read = self._reader.samples_read
            if found is not None:
                if self._epoch_items is not None:
                    self._epoch_items += 1
                return found
            self._skipped += len(self._reader.unreadable)
            self._reader = None
            st.order_pos, st.samples_read = st.order_pos + 1, 0
        return None

    def _emit(self, item: PoolItem) -> tuple[PoolItem, int]:
        return item, self.rng.getrandbits(31)

    def next_item(self) -> tuple[PoolItem, int]:
        st = self.state
        while True:
            if st.draining:
                if st.buffer:
                    j = self.rng.randrange(len(st.buffer))
                    st.buffer[j], st.buffer[-1] = st.buffer[-1], st.buffer[j]
                    return self._emit(st.buffer.pop())
                st.epoch, st.order_pos, st.samples_read, st.draining = st.epoch + 1, 0, 0, False
                self._epoch_items = 0
            elif st.pending_copies > 0:
                st.pending_copies -= 1
                if len(st.buffer) < self.buffer_size:
                    st.buffer.append(st.pending)
                    continue
                j = self.rng.randrange(self.buffer_size)
                out, st.buffer[j] = st.buffer[j], st.pending
                return self._emit(out)
            else:
                found = self._read()
                if found is None:
                    if self._epoch_items == 0 and not st.buffer:
                        raise PoolError(f"process {self.rank}: its {len(self.order(st.epoch))} shards hold no "
                                        "readable image; use fewer processes or pool: memory")
                    st.draining = True
                else:
                    st.pending, st.pending_copies = found

    def snapshot(self) -> dict[str, Any]:
        st = self.state
        return {"epoch": st.epoch, "order_pos": st.order_pos, "samples_read": st.samples_read,
                "draining": st.draining, "buffer": list(st.buffer), "pending": st.pending,
                "pending_copies": st.pending_copies, "rng": self.rng.getstate(),
                "rank": self.rank, "world": self.world, "seed": self.seed, "buffer_size": self.buffer_size}

    def restore(self, snap: dict[str, Any]) -> None:
        same = {k: snap[k] for k in ("rank", "world", "seed", "buffer_size")}
        if same != {"rank": self.rank, "world": self.world, "seed": self.seed, "buffer_size": self.buffer_size}:
            raise PoolError(f"the saved pool stream position was made with {same}; this run differs")
        self.state = StreamState(snap["epoch"], snap["order_pos"], snap["samples_read"], snap["draining"],
                                 list(snap["buffer"]), snap["pending"], snap["pending_copies"])
        self.rng.setstate(snap["rng"])
        self._reader = None
