"""What a run prints to its log: the header (what trains on what), a line per epoch, the end (caches, top-1)."""
from __future__ import annotations

from .models import num_params


def header(cfg, parts, ctx) -> str:
    L = parts.loop
    return (f"run {cfg.run_id}: {cfg.method} student {cfg.student} ({num_params(L.models.student) / 1e6:.2f}M) on "
            f"{cfg.dataset} [{len(parts.split['train'])} train / {len(parts.split['meta'])} meta / {parts.val_len} "
            f"val], augment {cfg.augment}, {cfg.epochs} epochs x {L.steps_per_epoch} steps, {ctx.device.type}, "
            f"world {ctx.world}, amp {L.precision.amp}")


def epoch_line(cfg, epoch: int, rec: dict, temps: dict, images: int = 0, wall: float = 0.0) -> str:
    """One line per epoch, readable in a log without a terminal: time, epoch, loss, top-1 when evaluated,
    temperatures, images/s of the epoch and the time left at that pace (``wall``: the run's seconds so far)."""
    import time

    temp = f" tau_t {temps['tau_t']:.3f} tau_s {temps['tau_s']:.3f}" if temps else ""
    acc = f" top1 {rec['top1']:.2f} top5 {rec['top5']:.2f}" if "top1" in rec else ""
    secs = rec.get("seconds") or 0.0
    speed = f" {images / secs:,.0f} img/s" if images and secs else ""
    left = cfg.epochs - epoch
    eta = f" ETA {_duration(wall / epoch * left)}" if epoch and left > 0 and wall else ""
    return (f"{time.strftime('%H:%M:%S')} epoch {epoch}/{cfg.epochs} loss {rec['train_loss']:.4f}{acc}{temp} "
            f"{secs:.1f}s{speed}{eta}")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def done_lines(feed, result: dict, wall: float, path) -> list[str]:
    lines = [feed.summary()] if feed.summary() else []
    return lines + [f"done: top1 {result['final_top1']:.2f} (best {result['best_top1']:.2f}) in {wall:.1f}s -> {path}"]
