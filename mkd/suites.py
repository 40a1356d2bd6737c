"""Suites as data: a YAML matrix of abstract axes, mapped per scale to concrete runs.

A suite file (``benchmarks/suites/NAME.yaml``)::

    description: what the study measures
    axes:                      # the matrix: every combination is a row
      teacher: [small, large]  # abstract: looked up in scales.<scale>.teachers
      augment: [weak, strong]
      method: [ce, kd, mkd]
      kd.tau_t: [1, 4]         # any config key, dotted for nested ones
    table: degradation         # optional: the table it wants (degradation, data_fraction, temperature_grid,
                               # imagenet_main, generic); without it the analysis picks one from the axes
    include: [{method: mkd, teacher: [small, large]}]   # extra rows; each item is itself a small matrix
    exclude: [{method: ce, augment: strong}]            # drop rows matching every given key
    config: {epochs: 10}       # overrides for every student run
    budget: equal_steps        # with a fraction axis: epochs (and warmup) scaled by 1/fraction, so every fraction
                               # gets the optimizer steps of the full set (default equal_epochs)
    scales:
      tiny:
        student: emb_vit_s     # or students: {ViT-T: deit_tiny_patch16_224, ...} when `student` is an axis
        method_students: {hard: {ViT-T: deit_tiny_distilled_patch16_224}}  # a method's own architecture
        teachers:
          small: {model: emb_vit_m, train: {epochs: 15}}        # trained by the suite (a teacher run)
          large: {model: resnet50, checkpoint: /path/ckpt.pth}  # or pretrained: true; validated (epochs 0)
        config: {dataset: embedded, epochs: 12}

Teachers are runs too, in ``results/teachers/<scale>/<run_id>``: trained or validated once and shared by
every suite naming the same teacher config.  Students point at the teacher run's ``model.pt``.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from . import methods
from .config import AUGMENTS, METHODS, RunConfig, from_dict, merge
from .errors import UserError, suggest
from .models import resolve
from .rundir import RunDir

SUITES_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "suites"
SCALES = ("tiny", "cifar", "imagenet")
ABSTRACT_AXES = ("teacher", "student")
SUITE_KEYS = ("question", "description", "axes", "include", "exclude", "config", "scales", "table", "budget", "tuning",
              "smallest_effect")
BUDGETS = ("equal_epochs", "equal_steps")
SCALE_KEYS = ("student", "students", "method_students", "teachers", "config", "description")
TEACHER_KEYS = ("model", "kwargs", "train", "checkpoint", "pretrained", "input")


@dataclass
class Run:
    """One planned run: a teacher or a student, with the suite rows it serves."""

    run_id: str
    kind: str  # "teacher" | "student" | "trial" (a tuning trial: mkd/tuning.py)
    config: RunConfig
    out: Path
    rows: list[dict] = field(default_factory=list)  # axis assignments this run stands for
    teacher: Optional[str] = None  # run_id of the teacher run it waits for
    after: Optional[str] = None  # run_id of the run that fills the stream caches it reads (it starts after it ends)
    label: str = ""  # one-line description for plans and status
    tuned: Optional[dict] = None  # a final run of a tuned setting: the chosen setting and its trials (run.json)
    reads_inputs: bool = False  # it reads its stream's decoded batches from the cache another run fills
    reads_logits: bool = False  # it reads its teacher's logits from the cache another run fills

    @property
    def name(self) -> str:
        return f"{self.kind} {self.run_id}"

    @property
    def dir(self) -> RunDir:
        return RunDir(self.out)


@dataclass
class Plan:
    suite: str
    scale: str
    path: Path
    description: str
    axes: dict[str, list]
    teachers: list[Run]
    students: list[Run]
    root: Path = Path("results")
    table: Optional[str] = None  # the table the suite asks for (analysis/tables.py), None: chosen from the axes
    cohorts: str = "auto"  # mkd/cohort.py: auto | on | off
    cohort_max: int = 8  # runs per cohort at most (a profile's cohort_max)
    trials: list[Run] = field(default_factory=list)  # tuning trials (mkd/tuning.py)
    waiting: list[Run] = field(default_factory=list)  # finals whose setting their trials have not chosen yet
    tuning: Optional[object] = None  # mkd.tuning.Tuning where it applies at this scale
    smallest_effect: Optional[dict] = None  # the suite's declared smallest effect of interest at this scale

    @property
    def runs(self) -> list[Run]:
        """Every run that can start now: teachers, tuning trials, students (not the finals waiting for trials)."""
        return self.teachers + self.trials + self.students

    def units(self) -> list[list[Run]]:
        """The plan as units of work, one process (a local worker, a Slurm array element) each: every teacher
        alone, the trials and students in cohorts of one teacher stream where ``cohorts`` asks for them
        (mkd/cohort.py)."""
        from .cohort import plan_cohorts

        return [[t] for t in self.teachers] + plan_cohorts(self.trials + self.students, self.cohorts, self.cohort_max)


def known_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def suite_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise UserError(f"suite file {p} not found: pass a suite name ({', '.join(known_suites())}) or a YAML path")
        return p
    q = SUITES_DIR / f"{name_or_path}.yaml"
    if not q.is_file():
        raise UserError(f"unknown suite '{name_or_path}'{suggest(name_or_path, known_suites())}; "
                        f"known suites: {', '.join(known_suites())} (or a path to a YAML file)")
    return q


def _fail(path: Path, key: str, msg: str) -> UserError:
    return UserError(f"{path.name}: {key}: {msg}")


def _check_keys(path: Path, where: str, d: Any, allowed: tuple) -> None:
    if not isinstance(d, dict):
        raise _fail(path, where or "<top>", f"must be a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            raise _fail(path, f"{where}.{k}".lstrip("."), f"unknown key{suggest(k, allowed)}; allowed: {', '.join(allowed)}")


def _values(path: Path, key: str, v: Any) -> list:
    vals = v if isinstance(v, list) else [v]
    if not vals:
        raise _fail(path, key, "is an empty list; give at least one value")
    return vals


def _check_axis_values(path: Path, where: str, axis: str, values: list, scale_spec: dict) -> None:
    allowed = {"augment": AUGMENTS, "method": METHODS}.get(axis)
    if axis == "teacher":
        allowed = tuple(scale_spec.get("teachers", {}) or {})
    if axis == "student" and "students" in scale_spec:
        allowed = tuple(scale_spec["students"])
    for v in values:
        if allowed is not None and v not in allowed and v is not None:
            raise _fail(path, f"{where}.{axis}", f"value {v!r}{suggest(str(v), [str(a) for a in allowed])}; "
                                                 f"allowed: {', '.join(map(str, allowed))}")
        if axis == "fraction" and not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise _fail(path, f"{where}.fraction", f"value {v!r} is outside (0, 1]; use e.g. 0.25")


def _matrix(spec: dict) -> list[dict]:
    keys = list(spec)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec[k] for k in keys))]


def _matches(row: dict, pattern: dict) -> bool:
    return all(row.get(k) in (v if isinstance(v, list) else [v]) for k, v in pattern.items())


def _has_key(d: dict, dotted: str) -> bool:
    """Whether a nested mapping sets ``dotted`` (``kd.tau_t``)."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _dotted(d: dict) -> dict:
    """{'kd.tau_t': 2} -> {'kd': {'tau_t': 2}}."""
    out: dict = {}
    for k, v in d.items():
        node = out
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def load_suite(name_or_path: str) -> tuple[Path, dict]:
    path = suite_path(name_or_path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})") from None
    _check_keys(path, "", spec, SUITE_KEYS)
    if not isinstance(spec.get("axes"), dict) or not spec["axes"]:
        raise _fail(path, "axes", "missing: give a mapping of axis -> list of values")
    if not isinstance(spec.get("scales"), dict) or not spec["scales"]:
        raise _fail(path, "scales", f"missing: give settings for at least one of {', '.join(SCALES)}")
    for s, sc in spec["scales"].items():
        if s not in SCALES:
            raise _fail(path, f"scales.{s}", f"unknown scale{suggest(s, SCALES)}; allowed: {', '.join(SCALES)}")
        _check_keys(path, f"scales.{s}", sc, SCALE_KEYS)
        for t, ts in (sc.get("teachers") or {}).items():
            _check_keys(path, f"scales.{s}.teachers.{t}", ts, TEACHER_KEYS)
            if "model" not in ts:
                raise _fail(path, f"scales.{s}.teachers.{t}", "needs model: a preset or timm name")
            if sum(ts.get(k) not in (None, False) for k in ("train", "checkpoint", "pretrained")) != 1:
                raise _fail(path, f"scales.{s}.teachers.{t}",
                            "needs exactly one of train: {...}, checkpoint: PATH, pretrained: true")
    return path, spec


def expand(name_or_path: str, scale: str = "tiny", results: Path | str = "results",
           filters: Optional[dict[str, list[str]]] = None, overrides: Optional[dict] = None,
           data_root: Optional[str] = None, axes: Optional[dict[str, list]] = None,
           teacher_checkpoints: Optional[dict[str, str]] = None, tune: bool = True, check_data: bool = True) -> Plan:
    """Validate the suite and expand it into runs for one scale; nothing is written.

    ``axes`` replaces axes' values (e.g. ``{"seed": [0, 1, 2]}``); ``filters`` keeps rows whose axis value
    (as a string) is listed; ``overrides`` is merged into every student's config (and, less the student-only
    keys, into the teachers'); ``teacher_checkpoints`` gives teachers local weights instead of their ``pretrained``
    or ``checkpoint`` ones (offline clusters, tests)."""
    path, spec = load_suite(name_or_path)
    for k, vals in (axes or {}).items():
        if k not in spec["axes"]:
            raise UserError(f"--axis {k}=...: {path.name} has no axis '{k}'{suggest(k, list(spec['axes']))}; "
                            f"axes: {', '.join(spec['axes'])}")
        spec["axes"][k] = vals
    if scale not in spec["scales"]:
        raise _fail(path, "scales", f"has no '{scale}' scale; it has: {', '.join(spec['scales'])} (use --scale)")
    sc = spec["scales"][scale]
    for label, ckpt in (teacher_checkpoints or {}).items():
        ts = (sc.get("teachers") or {}).get(label)
        if ts is None:
            raise UserError(f"--teacher-checkpoint {label}=...: scale {scale} of {path.name} has no teacher '{label}'"
                            f"{suggest(label, list(sc.get('teachers') or {}))}; teachers: {', '.join(sc.get('teachers') or {})}")
        if ts.get("train") is not None:
            raise UserError(f"--teacher-checkpoint {label}=...: teacher '{label}' is trained by the suite; "
                            "only pretrained or checkpoint teachers take local weights")
        sc["teachers"][label] = {**{k: v for k, v in ts.items() if k != "pretrained"}, "checkpoint": ckpt}
    for k in spec["axes"]:
        where = next((w for w, c in (("config", spec.get("config")), (f"scales.{scale}.config", sc.get("config")))
                      if isinstance(c, dict) and k in c), None)
        if where and k not in ABSTRACT_AXES:
            raise _fail(path, f"{where}.{k}", f"'{k}' is an axis of the suite, so its rows set it: remove it here "
                                               f"(or change the axis: --axis {k}=...)")
        if _has_key(overrides or {}, k):
            raise UserError(f"--set {k}=...: '{k}' is an axis of {path.name}, so its rows set it: use --axis {k}=...")
    rows = _filtered(_rows(path, spec, sc), filters or {})
    if not rows:
        raise _fail(path, "axes", "the matrix is empty after include/exclude/--filter")
    base = _base_config(spec, sc, scale, overrides, data_root, check_data)
    budget = spec.get("budget", "equal_epochs")
    if budget not in BUDGETS:
        raise _fail(path, "budget", f"unknown value {budget!r}{suggest(str(budget), BUDGETS)}; allowed: {', '.join(BUDGETS)}")
    needs = _teacher_needs(base)
    teacher_of = _teacher_runs(path, sc, scale, base, Path(results), sorted({r["teacher"] for r in rows if needs(r)}),
                               overrides)
    out = Path(results) / path.stem / scale
    build = lambda items, kind="student", registry=None: _student_runs(  # noqa: E731
        path, sc, scale, base, out, items, teacher_of, needs, budget, kind, registry)
    tuning = _tuning(path, spec, scale, rows, base, overrides) if tune else None
    trials, waiting = [], []
    if tuning is None:
        students = build([(r, {}) for r in rows])
        if not tune and _tuning(path, spec, scale, rows, base, None) is not None:  # the tables say it was skipped
            for r in students:
                r.tuned = {"setting": None, "skipped": "not tuned (--no-tuning): every method at the suite's own "
                                                       "setting"}
    else:
        trials, students, waiting = _tuned(tuning, rows, base, build)
    teachers = list({r.run_id: r for r in teacher_of.values()}.values())
    ordered = _order_producers(trials + students)
    _order_producers(waiting)  # which caches they will read, for the price; they start only once re-planned
    return Plan(path.stem, scale, path, str(spec.get("description", "")).strip(),
                {k: _values(path, f"axes.{k}", v) for k, v in spec["axes"].items()}, teachers,
                [r for r in ordered if r.kind == "student"], Path(results), table=spec.get("table"),
                trials=[r for r in ordered if r.kind == "trial"], waiting=waiting, tuning=tuning,
                smallest_effect=smallest_effect(path, spec, scale, (students or waiting or trials)[0].config))


SMALLEST_EFFECT_RULE = ("3 binomial standard errors of a top-1 near 70% on the validation set the tables report, "
                        "3 x sqrt(0.7 x 0.3 / n) x 100 points (n validation images): a difference below it is within "
                        "what the sampling of one evaluation moves")


def smallest_effect(path: Path, spec: dict, scale: str, cfg: RunConfig) -> dict:
    """The suite's smallest effect of interest at ``scale`` (points of top-1), fixed before its runs: the suite's
    ``smallest_effect: {rule: ..., SCALE: points}`` where it states one, else ``SMALLEST_EFFECT_RULE`` on the
    validation set the scale reports (tiny: 5,000 images -> 1.9; CIFAR-100: 10,000 -> 1.4; ImageNet: 50,000 -> 0.6).
    Never derived from results: the launcher records it in every run's run.json, the analysis reads it there."""
    import math

    from .cost import validation_images

    declared = spec.get("smallest_effect")
    if declared is not None:
        if not isinstance(declared, dict) or not isinstance(declared.get("rule"), str):
            raise _fail(path, "smallest_effect", "must be a mapping with rule: <how the numbers were fixed> and a "
                                                 "number of top-1 points per scale, e.g. {rule: ..., tiny: 2.0}")
        for k, v in declared.items():
            if k != "rule" and (k not in SCALES or not isinstance(v, (int, float)) or v <= 0):
                raise _fail(path, f"smallest_effect.{k}", "give positive top-1 points per scale "
                                                          f"({', '.join(SCALES)})")
        if scale in declared:
            return {"points": float(declared[scale]), "rule": " ".join(declared["rule"].split()), "source": f"{path.name}"}
    n = validation_images(cfg)
    return {"points": round(3 * math.sqrt(0.21 / n) * 100, 1), "rule": SMALLEST_EFFECT_RULE + f" (n = {n:,})",
            "source": "default rule (mkd/suites.py)"}


def _tuning(path: Path, spec: dict, scale: str, rows: list[dict], base: dict, overrides: Optional[dict]):
    """The suite's tuning at this scale (None where it does not apply); every method of the rows needs a grid, and
    no --set may fix a key the grid varies."""
    from . import tuning as T

    tuning = T.parse(path, spec.get("tuning"), METHODS)
    if tuning is None or not tuning.applies(scale):
        return None
    tuned = sorted({k for trials in tuning.grid.values() for t in trials for k in t})
    for k in tuned:
        if _has_key(overrides or {}, k):
            raise UserError(f"--set {k}=...: {path.name} tunes '{k}' at scale {scale} (tuning.grid): drop --set, "
                            "or pass --no-tuning to run every method at the suite's own setting")
    for m in sorted({r.get("method", base.get("method", "ce")) for r in rows}):
        if m not in tuning.grid:
            raise _fail(path, "tuning.grid", f"has no grid for method '{m}' (tuned at scale {scale}): add one of "
                                             f"{tuning.trials_per_method} trials, as every method gets")
    return tuning


def _tuned(tuning, rows: list[dict], base: dict, build) -> tuple[list[Run], list[Run], list[Run]]:
    """(trials, finals ready, finals waiting): each setting's trials, and its finals with the chosen setting once
    every trial has ended (``mkd/tuning.py``)."""
    from . import tuning as T

    registry: dict[str, Run] = {}
    groups: dict[tuple, list] = {}
    for row in rows:
        key = T.setting_key(row)
        if key in groups:
            continue
        method = row.get("method", base.get("method", "ce"))
        bare = {k: v for k, v in row.items() if k != "seed"}
        groups[key] = [(build([({**bare, "seed": s}, {**ov, "tune_holdout": tuning.holdout}) for s in tuning.seeds],
                              "trial", registry), ov) for ov in tuning.grid[method]]
    ready, pending, choices = [], [], {}
    for row in rows:
        key = T.setting_key(row)
        choice = choices.get(key) or T.choose(groups[key], lambda r: r.dir.outcome())
        choices[key] = choice
        (ready if choice.overrides is not None else pending).append((row, choice.overrides or {}))
    finals = build(ready)
    for r in finals:
        r.tuned = choices[T.setting_key(r.rows[0])].record(tuning)
    known = {r.run_id for r in finals}
    waiting = [r for r in build(pending) if r.run_id not in known]
    for r in waiting:
        r.label += f"  [waits for its tuning trials: {choices[T.setting_key(r.rows[0])].reason}]"
    return list(registry.values()), finals, waiting


def _rows(path: Path, spec: dict, sc: dict) -> list[dict]:
    """The matrix of the axes, plus include rows, minus exclude rows."""
    axes = {k: _values(path, f"axes.{k}", v) for k, v in spec["axes"].items()}
    for k, vals in axes.items():
        _check_axis_values(path, "axes", k, vals, sc)
    rows = _matrix(axes)
    for i, inc in enumerate(spec.get("include") or []):
        if not isinstance(inc, dict):
            raise _fail(path, f"include[{i}]", "must be a mapping of axis -> value(s)")
        inc = {k: _values(path, f"include[{i}].{k}", v) for k, v in inc.items()}
        for k, vals in inc.items():
            _check_axis_values(path, f"include[{i}]", k, vals, sc)
        rows += [r for r in _matrix(inc) if r not in rows]
    for i, exc in enumerate(spec.get("exclude") or []):
        if not isinstance(exc, dict):
            raise _fail(path, f"exclude[{i}]", "must be a mapping of axis -> value(s)")
        rows = [r for r in rows if not _matches(r, exc)]
    return rows


def _filtered(rows: list[dict], filters: dict[str, list[str]]) -> list[dict]:
    for k, wanted in filters.items():
        names = sorted({k2 for r in rows for k2 in r})
        if k not in names:
            raise UserError(f"--filter {k}=...: unknown axis '{k}'{suggest(k, names)}; axes: {', '.join(names)}")
        present = sorted({str(r.get(k)) for r in rows})
        for w in wanted:
            if w not in present:
                raise UserError(f"--filter {k}={','.join(wanted)}: no row has {k}={w}{suggest(w, present)}; "
                                f"values: {', '.join(present)}")
        rows = [r for r in rows if str(r.get(k)) in wanted]
    return rows


def _base_config(spec: dict, sc: dict, scale: str, overrides: Optional[dict], data_root: Optional[str],
                 check_data: bool = True) -> dict:
    """Every student's config before its row: suite config, the scale's (which wins), overrides, data root."""
    base = merge(spec.get("config") or {}, sc.get("config") or {})
    if overrides:
        base = merge(base, overrides)
    if data_root:
        base["data_root"] = data_root
    if not check_data:  # a price needs no dataset: its sizes are known
        base.setdefault("data_root", base.get("data_root") or "DATA_ROOT")
        return base
    if base.get("dataset", "embedded") in ("imagenet", "cifar100") and not base.get("data_root"):
        what = "ImageNet (train/ and val/)" if base.get("dataset") == "imagenet" else "CIFAR-100 (cifar-100-python/)"
        if not (base.get("dataset") == "cifar100" and base.get("download")):
            raise UserError(f"--scale {scale} needs a dataset root: pass --data-root DIR holding {what}, "
                            "or set data_root in the Slurm profile")
    if base.get("data_root") and not Path(os.path.expanduser(str(base["data_root"]))).exists() \
            and not base.get("download"):
        raise UserError(f"dataset root {base['data_root']} does not exist: pass an existing --data-root")
    return base


def _teacher_needs(base: dict):
    def needs(row: dict) -> bool:
        method = row.get("method", base.get("method", "ce"))
        return row.get("teacher") is not None and methods.get(method).needs_teacher
    return needs


def _build(path: Path, d: dict, where: str) -> RunConfig:
    try:
        return from_dict(d)
    except UserError as e:
        raise _fail(path, where, str(e)) from None


def _model_ok(path: Path, name: str, where: str) -> None:
    try:
        resolve(name)
    except UserError as e:
        raise _fail(path, where, str(e)) from None


TEACHER_INHERITS = ("dataset", "data_root", "download", "stage_dir", "img_size", "embedded", "meta_split", "holdout", "split_seed",
                    "num_workers", "amp", "compile", "eval_every", "eval_batch_size", "checkpoint_minutes",
                    "checkpoint_every_steps")
# what a teacher trained by the suite takes from the scale's recipe unless its ``train:`` says otherwise
TEACHER_RECIPE = ("batch_size", "warmup_epochs", "min_lr", "weight_decay", "clip_grad", "repeated_aug", "optimizer",
                  "momentum", "nesterov", "lr_schedule", "decay_epochs", "decay_rate", "decay_milestones",
                  "decay_fractions", "lr_per", "lr_epoch_lag")
# --set keys that describe the student's run only (everything else reaches the teachers too)
STUDENT_ONLY = ("method", "student", "student_kwargs", "teacher", "teacher_kwargs", "teacher_checkpoint",
                "teacher_pretrained", "teacher_input", "fraction", "seed", "init_checkpoint", "pretrained",
                "teacher_cache", "teacher_cache_topk", "input_cache")


def _teacher_overrides(overrides: Optional[dict], trained: bool) -> dict:
    """The --set overrides a teacher run takes: not the student-only keys nor the method sections, and for a
    validated teacher nothing that would make it train."""
    sections = set(methods.sections())
    out = {k: v for k, v in (overrides or {}).items() if k not in STUDENT_ONLY and k not in sections}
    if not trained:
        for k in ("epochs", "augment", "lr", "drop_path", *TEACHER_RECIPE):
            out.pop(k, None)
    return out


def _teacher_runs(path: Path, sc: dict, scale: str, base: dict, results: Path, labels: list[str],
                  overrides: Optional[dict] = None) -> dict[str, Run]:
    """One run per teacher label: trained by the suite (``train:``) or validated (checkpoint / pretrained),
    shared by every suite naming the same teacher config (``results/teachers/<scale>/<run_id>``)."""
    runs: dict[str, Run] = {}
    of: dict[str, Run] = {}
    for label in labels:
        ts = sc["teachers"][label]
        where = f"scales.{scale}.teachers.{label}"
        _model_ok(path, ts["model"], f"{where}.model")
        tcfg = {k: v for k, v in base.items() if k in TEACHER_INHERITS}
        tcfg.update(method="ce", student=ts["model"], student_kwargs=ts.get("kwargs") or {}, fraction=1.0, seed=0,
                    input_cache="off")  # no other run reads a teacher's training stream
        trained = ts.get("train") is not None
        if trained:
            tcfg.update({k: base[k] for k in TEACHER_RECIPE if k in base})
            tcfg = merge(tcfg, {"augment": "none", **ts["train"]})
        else:
            tcfg.update(epochs=0, augment="none", student_input=_teacher_input(ts))
            if ts.get("checkpoint"):
                tcfg["init_checkpoint"] = os.path.expanduser(str(ts["checkpoint"]))
                if not Path(tcfg["init_checkpoint"]).is_file():
                    raise _fail(path, f"{where}.checkpoint", f"{tcfg['init_checkpoint']} not found; give an existing checkpoint file")
            else:
                tcfg["pretrained"] = True
        tcfg = merge(tcfg, _teacher_overrides(overrides, trained))
        cfg = _build(path, tcfg, where)
        how = "trained" if ts.get("train") is not None else "validated"
        run = runs.get(cfg.run_id) or Run(cfg.run_id, "teacher", cfg, results / "teachers" / scale / cfg.run_id,
                                          label=f"teacher {label}: {ts['model']} ({how})")
        run.rows.append({"teacher": label})
        runs[cfg.run_id] = of[label] = run
    return of


def _teacher_input(ts: dict) -> str:
    """A teacher trained by the suite takes the stream's normalisation; one with pretrained weights (or a
    checkpoint) its own, from timm's pretrained config (``input: dataset`` says otherwise)."""
    return ts.get("input") or ("dataset" if ts.get("train") is not None else "model")


def _equal_steps(d: dict) -> dict:
    """Epochs and warmup scaled by 1/fraction: a fraction f of the data for 1/f as many epochs is the full set's
    number of optimizer steps (to within the partial batch each epoch drops: 5% at fraction 0.1 of the tiny data),
    so fractions compare data, not training length."""
    f = float(d.get("fraction", 1.0))
    cfg = RunConfig()
    epochs, warmup = d.get("epochs", cfg.epochs), d.get("warmup_epochs", cfg.warmup_epochs)
    every = d.get("eval_every", cfg.eval_every)  # as many evaluations as the full set's run, not 1/f as many
    return {**d, "epochs": max(1, round(epochs / f)), "warmup_epochs": warmup / f,
            "eval_every": max(1, round(every / f))}


def _student_runs(path: Path, sc: dict, scale: str, base: dict, out: Path, items: list[tuple[dict, dict]],
                  teacher_of: dict[str, Run], needs, budget: str = "equal_epochs", kind: str = "student",
                  registry: Optional[dict] = None) -> list[Run]:
    """One run per distinct student config; a run that serves several rows (CE ignores the teacher) lists them.
    ``items``: (row, extra overrides: a tuning trial's setting or the chosen one); ``registry``: runs already
    built by earlier calls (shared across a tuning's trials), extended in place."""
    students: dict[str, Run] = {}
    registry = {} if registry is None else registry
    for row, extra in items:
        d = merge(base, {})
        own = (sc.get("method_students") or {}).get(row.get("method")) or {}
        if "student" in row and row["student"] in own:  # e.g. hard distillation with the distillation token
            d["student"] = own[row["student"]]
        elif "student" in row and "students" in sc:
            d["student"] = sc["students"][row["student"]]
        elif "student" in sc:
            d.setdefault("student", sc["student"])
        for k, v in row.items():
            if k not in ABSTRACT_AXES:
                d = merge(d, _dotted({k: v}))
        d = merge(d, _dotted(extra))
        if budget == "equal_steps":
            d = _equal_steps(d)
        trun = teacher_of[row["teacher"]] if needs(row) else None
        if trun is not None:
            ts = sc["teachers"][row["teacher"]]
            d.update(teacher=ts["model"], teacher_kwargs=ts.get("kwargs") or {}, teacher_checkpoint=str(trun.dir.model),
                     teacher_input=_teacher_input(ts))
        where = "row " + ", ".join(f"{k}={v}" for k, v in row.items())
        cfg = _build(path, d, where)
        _model_ok(path, cfg.student, f"scales.{scale}.student ({where})")
        label = " ".join(f"{k}={v}" for k, v in row.items() if not (k == "teacher" and not cfg.uses_teacher))
        if kind == "trial":
            label += " | trial " + ", ".join(f"{k}={v}" for k, v in extra.items() if k != "tune_holdout")
        run = students.get(cfg.run_id) or registry.get(cfg.run_id) or Run(
            cfg.run_id, kind, cfg, out / cfg.run_id, teacher=trun.run_id if trun else None, label=label)
        if row not in run.rows:
            run.rows.append(row)
        students[cfg.run_id] = registry[cfg.run_id] = run
    return list(students.values())


def _order_producers(runs: list[Run]) -> list[Run]:
    """Name, per data stream and per (teacher, stream), the run that fills its caches first; the others wait for it.

    The first run of a data stream with a teacher (the one whose method declares the cheapest step: the fewest
    extra student forwards, no meta step; KD before MKD) computes the
    stream's input batches and its teacher's logits; the first run of each other teacher on that stream waits
    for it and computes only its teacher's logits; every other run waits for the run that filled what it reads.
    Producers go first in the returned order, so the local runner starts them first."""
    def rank(r: Run) -> tuple:  # from the methods' declarations: the cheapest step fills the caches
        m = methods.get(r.config.method)
        return (r.config.teacher_stream_key() is None, m.extra_student_forwards(r.config), m.has_meta_step_class())

    by_stream: dict[str, Run] = {}
    by_teacher: dict[str, Run] = {}
    for r in sorted(runs, key=rank):  # stable: plan order within each group
        tkey, skey = r.config.teacher_stream_key(), r.config.stream_key()
        data_producer = by_stream.get(skey) if r.config.caches_inputs else None
        if tkey is not None and tkey not in by_teacher:
            by_teacher[tkey] = r
            r.after = data_producer.run_id if data_producer else None
        elif tkey is not None:
            r.after = by_teacher[tkey].run_id
            r.reads_logits = True
        else:
            r.after = data_producer.run_id if data_producer else None
        r.reads_inputs = bool(r.config.caches_inputs and r.after)
        if r.config.caches_inputs:
            by_stream.setdefault(skey, r)
    producers = {r.after for r in runs if r.after}
    return [r for r in runs if r.run_id in producers] + [r for r in runs if r.run_id not in producers]
