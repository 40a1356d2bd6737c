#!/usr/bin/env python
"""Repeatability of MKD's hypergradient under stochastic layers: ``python benchmarks/hypergrad_spread.py``.

Trains ``emb_vit_s`` (and optionally a BatchNorm CNN) for ``--steps`` steps on the embedded data, then takes one
more training step and computes the hypergradient of that step ``--repeats`` times per mode, each time from
another current RNG state (as happens in training, where the meta step runs after other random draws).

- ``replayed``: the suite's meta step, which replays the RNG state the real forward started from;
- ``not replayed``: the same computation with ``rng=None``, i.e. every extra forward draws fresh drop-path and
  dropout masks (what the suite did before the masks were replayed).

Per (mode, drop path, replay) it prints the spread (max - min over repeats, per temperature, largest of the two)
divided by |exact hypergradient of the step taken|, and how many repeats have the exact value's sign for both
temperatures.  fp32, CPU; a few seconds per setting.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mkd.augment import build_augment  # noqa: E402
from mkd.config import RunConfig  # noqa: E402
from mkd.data import Transformed, load_base  # noqa: E402
from mkd.methods.common import eval_logits  # noqa: E402
from mkd.methods.mkd import MKD  # noqa: E402
from mkd.meta import capture_rng, hypergradient  # noqa: E402
from mkd.models import create_model  # noqa: E402


def setting(student_name: str, drop_path: float, steps: int, repeats: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    cfg = RunConfig(method="mkd", teacher="emb_vit_m")
    train, _, info = load_base(cfg)
    ds = Transformed(train, None, build_augment("none", info.img_size, info.mean, info.std,
                                                info.num_classes).eval_transform)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor(train.targets)
    student = create_model(student_name, info.num_classes, info.img_size, drop_path=drop_path).train()
    teacher = create_model("emb_vit_m", info.num_classes, info.img_size).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=4e-3)
    for _ in range(steps):  # a student some way into training
        i = torch.randint(0, len(xs), (128,))
        F.cross_entropy(eval_logits(student(xs[i])), ys[i]).backward()
        opt.step()
        opt.zero_grad()
    i, j = torch.randint(0, len(xs), (128,)), torch.randint(0, len(xs), (64,))
    x, y, xm, ym = xs[i], ys[i], xs[j], ys[j]
    with torch.no_grad():
        tl = 3 * teacher(x)
    targets = F.one_hot(y, info.num_classes).float()
    method = MKD(cfg, info.num_classes)
    temps, loss_fn = method.temps, method.loss_with
    rng = capture_rng("cpu")
    out = student(x)
    tau_t, tau_s = temps(targets)
    loss_fn(out, tl, targets, tau_t.detach(), tau_s.detach())["loss"].backward()
    grads = [p.grad.clone() for p in student.parameters()]
    lr = opt.param_groups[0]["lr"]

    def h(mode, replay, k):
        torch.manual_seed(10_000 + k)  # another current RNG state for each repeat
        hg, _ = hypergradient(mode, student, x, targets, tl, temps, loss_fn, lr, xm, ym, out=out.detach(),
                              grads=grads, rng=rng if replay else None)
        return torch.cat([t.reshape(-1) for t in hg])

    ref = h("exact", True, 0)
    rows = []
    for replay in (False, True):
        for mode in ("exact", "jvp", "fd"):
            hs = torch.stack([h(mode, replay, k) for k in range(repeats)])
            spread = float(((hs.max(0).values - hs.min(0).values) / ref.abs()).max())
            signs = int((torch.sign(hs) == torch.sign(ref)).all(1).sum())
            err = float(((hs.mean(0) - ref).norm() / ref.norm()))
            rows.append({"student": student_name, "drop_path": drop_path, "replayed": replay, "mode": mode,
                         "spread_over_exact": spread, "right_sign": f"{signs}/{repeats}", "mean_rel_error": err})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps before the measured one")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--students", default="emb_vit_s", help="comma-separated presets, e.g. emb_vit_s,emb_resnet")
    args = ap.parse_args(argv)
    print("| student | drop path | masks | mode | spread / abs(exact) | right sign | rel. error of the mean |")
    print("|---|---|---|---|---|---|---|")
    for name in args.students.split(","):
        for dp in (0.0, 0.1):
            for r in setting(name, dp, args.steps, args.repeats):
                print(f"| {r['student']} | {r['drop_path']} | {'replayed' if r['replayed'] else 'fresh'} | "
                      f"{r['mode']} | {r['spread_over_exact']:.2e} | {r['right_sign']} | {r['mean_rel_error']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
