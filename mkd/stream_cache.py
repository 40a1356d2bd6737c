"""What every method computes identically on one data stream, computed once: the teacher's logits and, where
they are small, the student's input batches.

Why: in a matrix each (teacher, augmentation, seed) feeds several methods (four in the degradation study,
sixteen fixed-temperature KD runs in the temperature grid).  The logits a teacher gives a batch depend on the
batch only, not on the student's method or temperature, and the batches are a pure function of the stream
(``mkd/stream.py``).  So the first run of a stream records, epoch by epoch, exactly what the loop used: the
teacher's logits on the student's own (mixed) batch, in the dtype the loop produced them (Fast Knowledge
Distillation stores soft labels per crop for the same reason; Beyer et al. 2022 show why the teacher must see
the student's view).  Later runs of any method read them; their weights and metrics are those of a run that
computed everything (bitwise on CPU; tested).

Files: ``<dir>/<key hash>/epoch0007.rank0.pt``, each holding its full key; a file whose key is not the reader's
is never used.  Writes are atomic and under a per-epoch lock (a second writer of the same epoch skips).
Teacher logits live next to the teacher's run (``<teacher run>/teacher_cache/``); input batches, only where an
epoch of them is small (``input_cache=auto``: the embedded data inside a suite, 17 MB an epoch), in the suite's folder
(``<results>/<suite>/<scale>/.streams/``).

Top-k (``teacher_cache_topk=k``): the k largest logits per image plus the log-sum-exp of all of them; the others
are set to one value that gives them their true total probability mass at temperature 1 (exact when k >= the
number of classes; see the README for the measured error).  Every run of the stream, the first included, then
trains on the same reconstruction.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from . import atomic
from .batch import Batch
from .stream import mix_seed, to_device

CACHE_VERSION = 2  # 2: input batches keep the hard labels and the mixing weight


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_sha(module: torch.nn.Module) -> str:
    """A hash of a model's parameters and buffers (names, shapes, dtypes, bytes): the teacher's identity."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class EpochFiles:
    """One folder of per-epoch files written once and read many times; each file carries its key."""

    root: Path
    key: dict
    rank: int = 0
    say: Callable = print

    @property
    def dir(self) -> Path:
        return self.root / key_hash(self.key)

    def path(self, epoch: int) -> Path:
        return self.dir / f"epoch{epoch:04d}.rank{self.rank}.pt"

    def read(self, epoch: int) -> Optional[dict]:
        """The epoch's tensors, or None when absent; a damaged file is moved aside, a foreign one ignored."""
        p = self.path(epoch)
        if not p.exists():
            return None
        try:
            d = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(d, dict) or "key" not in d:
                raise ValueError("no key")
        except Exception as e:  # cut short by a full disk or a copy: keep it aside, recompute
            self.say(f"{p} is damaged ({type(e).__name__}): moved aside to {atomic.move_aside(p).name}; recomputing")
            return None
        if json.loads(d["key"]) != self.key:
            self.say(f"{p} holds another stream or teacher (key mismatch): not used")
            return None
        return d

    def write(self, epoch: int, tensors: dict[str, Tensor]) -> bool:
        """Write the epoch unless it exists or another process is writing it; False when skipped.  A full disk
        only costs the cache (the run goes on, a later run recomputes)."""
        p = self.path(epoch)
        if p.exists():
            return False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / f".epoch{epoch:04d}.rank{self.rank}.lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                if p.exists():
                    return False
                atomic.write_dumped(p, lambda f: torch.save({"key": json.dumps(self.key, sort_keys=True, default=str), **tensors}, f))
            key_file = self.dir / "key.json"
            if not key_file.exists():
                atomic.write_json(key_file, self.key)
            return True
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise
            self.say(f"could not write {p} ({e.strerror}): the run goes on without caching this epoch")
            return False


def to_host(t: Tensor) -> Tensor:
    """A host copy of a device tensor without waiting for it: into pinned memory, asynchronously (the epoch's
    writer synchronises once, before saving).  CPU tensors are kept as they are."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def _tensors_of(b: Batch) -> dict[str, Tensor]:
    """What an input-cache file keeps of a batch: the stream's part (the teacher's logits are cached apart)."""
    out = {"x": b.x, "targets": b.targets, "labels": b.labels, "lam": torch.tensor(b.lam, dtype=torch.float64)}
    if b.labels_b is not None:
        out["labels_b"] = b.labels_b
    return out


def _stored_batch(d: dict, i: int, device: torch.device) -> Batch:
    def get(k):
        return d[k][i].to(device, non_blocking=True) if k in d else None
    return Batch(get("x"), get("targets"), get("labels"), get("labels_b"), float(d["lam"][i]))


# ---------------------------------------------------------------------------- top-k
def topk_compress(logits: Tensor, k: int) -> dict[str, Tensor]:
    values, index = logits.topk(k, dim=-1)
    itype = torch.int16 if logits.shape[-1] <= 32767 else torch.int32
    return {"values": values, "index": index.to(itype), "lse": torch.logsumexp(logits.float(), -1)}


def topk_expand(c: dict[str, Tensor], num_classes: int) -> Tensor:
    """Logits whose top-k entries are the stored ones and whose others share the rest of the probability mass."""
    values, index, lse = c["values"], c["index"].long(), c["lse"].float()
    k = values.shape[-1]
    if k >= num_classes:
        return torch.zeros(*values.shape[:-1], num_classes, dtype=values.dtype, device=values.device).scatter(
            -1, index, values)
    top_mass = torch.exp(torch.logsumexp(values.float(), -1) - lse).clamp(max=1 - 1e-6)
    rest = lse + torch.log1p(-top_mass) - math.log(num_classes - k)
    out = rest[..., None].expand(*values.shape[:-1], num_classes).clone()
    return out.scatter(-1, index, values.float()).to(values.dtype)


# ---------------------------------------------------------------------------- the feed
@dataclass
class Feed:
    """(x, targets, teacher logits) for every step of an epoch, from the caches when they hold the epoch, else
    from the loader, the batch augmentation and the teacher; a whole epoch computed here is written back."""

    loader: Callable[[int, int], object]  # (epoch, first step) -> StreamSource batches (mkd/stream.py)
    augment: object  # AugmentPreset
    seed: int
    device: torch.device
    autocast: Callable
    teacher_fwd: Optional[Callable] = None
    num_classes: int = 0
    topk: int = 0
    inputs: Optional[EpochFiles] = None
    teacher: Optional[EpochFiles] = None
    normalize: Optional[Callable] = None  # uint8 -> normalised float on the device (mkd/stream.DeviceNormalize)
    hits: dict = field(default_factory=lambda: dict.fromkeys(  # what came from where, for the log and result
        ("inputs_read", "inputs_written", "teacher_read", "teacher_written"), 0))

    def summary(self) -> Optional[str]:
        """What the run read from and wrote to the stream caches (None without caches), for its log."""
        h, parts = self.hits, []
        if self.teacher is not None:
            parts.append(f"teacher logits {h['teacher_read']} epochs read, {h['teacher_written']} written")
        if self.inputs is not None:
            parts.append(f"input batches {h['inputs_read']} epochs read, {h['inputs_written']} written")
        return "stream cache: " + "; ".join(parts) if parts else None

    def epoch(self, epoch: int, first_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` (0-based) from step ``first_step`` on, teacher logits included."""
        dev = self.device
        stored_x = self.inputs.read(epoch) if self.inputs is not None else None
        stored_t = self.teacher.read(epoch) if (self.teacher is not None and self.teacher_fwd is not None) else None
        whole = first_step == 0
        rec_x = [] if (self.inputs is not None and stored_x is None and whole) else None
        rec_t = [] if (self.teacher is not None and self.teacher_fwd is not None and stored_t is None and whole) else None
        if stored_x is not None:
            self.hits["inputs_read"] += 1
            batches = (_stored_batch(stored_x, i, dev) for i in range(first_step, len(stored_x["x"])))
        else:
            batches = self._augmented(epoch, first_step)
        step = first_step
        for b in batches:
            if rec_x is not None:
                rec_x.append(b)
            t = None
            if self.teacher_fwd is not None:
                if stored_t is not None:
                    t = self._stored_logits(stored_t, step).to(dev, non_blocking=True)
                else:
                    with torch.no_grad(), self.autocast():
                        t = self.teacher_fwd(b.x)
                    if self.topk:
                        c = topk_compress(t, self.topk)
                        t = topk_expand(c, self.num_classes)
                        if rec_t is not None:
                            rec_t.append({k: to_host(v) for k, v in c.items()})
                    elif rec_t is not None:
                        rec_t.append(to_host(t))
            if rec_x is not None:
                rec_x[-1] = {k: to_host(v) for k, v in _tensors_of(b).items()}
            yield b.with_teacher(t)
            step += 1
        if stored_t is not None:
            self.hits["teacher_read"] += 1
        if (rec_x or rec_t) and dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the asynchronous copies into pinned memory are complete
        if rec_x:
            ok = self.inputs.write(epoch, {k: torch.stack([r[k] for r in rec_x]) for k in rec_x[0]})
            self.hits["inputs_written"] += ok
        if rec_t:
            if self.topk:
                ok = self.teacher.write(epoch, {k: torch.stack([r[k] for r in rec_t]) for k in rec_t[0]})
            else:
                ok = self.teacher.write(epoch, {"logits": torch.stack(rec_t)})
            self.hits["teacher_written"] += ok

    def _augmented(self, epoch: int, first_step: int):
        for i, raw in enumerate(self.loader(epoch, first_step), start=first_step):
            x, y = to_device(raw, self.device, self.normalize)
            yield self.augment.batch(x, y, seed=mix_seed(self.seed, epoch, i))

    def _stored_logits(self, d: dict, step: int) -> Tensor:
        if "logits" in d:
            return d["logits"][step]
        return topk_expand({k: d[k][step] for k in ("values", "index", "lse")}, self.num_classes)
