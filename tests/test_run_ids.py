"""Run ids are the names of finished results: a change that alters one orphans every result of that config.
These pins make such a change deliberate (update the ids here, and say so in the commit)."""
from __future__ import annotations

import pytest

from mkd.config import load_config

TEACHER = ["teacher=emb_vit_m", "teacher_checkpoint=results/teachers/tiny/abc/model.pt"]
PINNED = {
    "ce": (["method=ce"], "75c8987ec8df"),
    "kd": (["method=kd", *TEACHER], "47d5c6070ded"),
    "hard": (["method=hard", "student=emb_deit_s_distilled", *TEACHER], "97ff3457a024"),
    # ctkd: 41b20171c645 before ctkd.weights (official CE/KD), 3648b7f72101 before a short ramp rose per step
    "ctkd": (["method=ctkd", *TEACHER], "62689681a721"),
    "dist": (["method=dist", *TEACHER], "f586d91fb207"),
    "dkd": (["method=dkd", *TEACHER], "5de172c11838"),  # a0c7c3f207c6 before a short warm-up rose per step
    "mkd": (["method=mkd", *TEACHER], "b04339141d66"),
    "mkd, cifar, strong, jvp": (["method=mkd", *TEACHER, "augment=strong", "dataset=cifar100", "data_root=/x",
                                 "mkd.hypergrad=jvp"], "9d3770fbe094"),
    "kd, imagenet, pretrained ViT-L": (["method=kd", "teacher=vit_large_patch16_224.augreg_in21k_ft_in1k",
                                        "teacher_pretrained=true", "teacher_input=model", "dataset=imagenet",
                                        "data_root=/x", "repeated_aug=3"], "8e30ba4e2748"),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_run_ids_are_pinned(name):
    overrides, run_id = PINNED[name]
    assert load_config(overrides=overrides).run_id == run_id


def test_locations_and_unhashed_keys_do_not_change_a_run_id():
    base = load_config(overrides=["method=kd", *TEACHER]).run_id
    moved = ["method=kd", "teacher=emb_vit_m", "teacher_checkpoint=/elsewhere/teachers/tiny/abc/model.pt"]
    assert load_config(overrides=moved).run_id == base, "a teacher checkpoint counts by its last two path parts"
    assert load_config(overrides=["method=kd", *TEACHER, "num_workers=8", "eval_every=5", "teacher_cache=off",
                                  "checkpoint_minutes=30", "compile=on"]).run_id == base
    assert load_config(overrides=["method=kd", *TEACHER, "holdout=all"]).run_id != base
