"""What a run prints to its log: the header (what trains on what), a line per epoch, the end (caches, top-1)."""
from __future__ import annotations

from .models import num_params


def header(cfg, parts, ctx) -> str:
    L = parts.loop
    return (f"run {cfg.run_id}: {cfg.method} student {cfg.student} ({num_params(L.models.student) / 1e6:.2f}M) on "
            f"{cfg.dataset} [{len(parts.split['train'])} train / {len(parts.split['meta'])} meta / {parts.val_len} "
            f"val], augment {cfg.augment}, {cfg.epochs} epochs x {L.steps_per_epoch} steps, {ctx.device.type}, "
            f"world {ctx.world}, amp {L.precision.amp}")


def epoch_line(cfg, epoch: int, rec: dict, temps: dict) -> str:
    temp = f" tau_t {temps['tau_t']:.3f} tau_s {temps['tau_s']:.3f}" if temps else ""
    acc = f" top1 {rec['top1']:.2f} top5 {rec['top5']:.2f}" if "top1" in rec else ""
    return f"epoch {epoch}/{cfg.epochs} loss {rec['train_loss']:.4f}{acc}{temp} {rec['seconds']:.1f}s"


def done_lines(feed, result: dict, wall: float, path) -> list[str]:
    lines = [feed.summary()] if feed.summary() else []
    return lines + [f"done: top1 {result['final_top1']:.2f} (best {result['best_top1']:.2f}) in {wall:.1f}s -> {path}"]
