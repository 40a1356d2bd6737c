"""What the analysis asks of the tidy runs frame (``collect.py``): which methods it holds, in which order and role,
how each is named, which train without a teacher.  Every analysis module reads the frame through these, never the
method classes (the launcher writes each method's declarations into run.json)."""
from __future__ import annotations

import math
from typing import Optional

import pandas as pd


def methods_in(df: pd.DataFrame) -> list:
    """The methods of a frame in their declared table order (``Method.order`` via run.json), then by name."""
    names = sorted_values(df["method"])
    order = df.groupby("method")["method_order"].min().to_dict() if "method_order" in df else {}

    def key(m):
        o = order.get(m)
        return (100 if o is None or (isinstance(o, float) and math.isnan(o)) else o, str(m))

    return sorted(names, key=key)


def role_of(df: pd.DataFrame, role: str) -> Optional[str]:
    """The method of the frame that declares ``role`` (``Method.role`` via run.json: baseline, reference,
    subject, rival), None when no run of it is there; a method without a role that needs no teacher is the
    baseline (results written before methods declared roles)."""
    return next(iter(roles_of(df, role)), None)


def roles_of(df: pd.DataFrame, role: str) -> list:
    """Every method of the frame declaring ``role``, in table order."""
    if "method" not in df or not len(df):
        return []
    decl = df.drop_duplicates("method").set_index("method")
    out = []
    for m in methods_in(df):
        r = decl.at[m, "method_role"] if "method_role" in decl else None
        if (r is None or (isinstance(r, float) and math.isnan(r))) and "needs_teacher" in decl \
                and decl.at[m, "needs_teacher"] is False:
            r = "baseline"
        if r == role:
            out.append(m)
    return out


def label_of(df: pd.DataFrame, method: str) -> str:
    """How tables name a method: its declared label."""
    if "method_label" in df:
        lab = df.loc[df["method"] == method, "method_label"].dropna()
        if len(lab):
            return str(lab.iloc[0])
    return str(method)


def teacherless(df: pd.DataFrame) -> set:
    """Methods that train without a teacher (their runs serve every teacher row)."""
    if "needs_teacher" in df:
        return set(df.loc[df["needs_teacher"] == False, "method"])  # noqa: E712 (a column of objects)
    base = role_of(df, "baseline")
    return {base} if base else set()


def learned(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of methods that learn their temperatures (MKD, CTKD, ...), by their declaration."""
    if "learns_temperature" not in df:
        return df.iloc[0:0]
    return df[df["learns_temperature"].fillna(False).astype(bool)]



def sorted_values(values, order=None) -> list:
    vals = [v for v in pd.unique(values) if not (isinstance(v, float) and math.isnan(v))]
    if order:
        return sorted(vals, key=lambda v: (order.index(v) if v in order else len(order), str(v)))
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def teachers_by_size(df: pd.DataFrame) -> list:
    """The teacher labels of a frame, smallest first (by their parameters; unknown sizes last)."""
    if "teacher" not in df:
        return []
    teachers = sorted_values(df["teacher"].dropna())
    sizes = df["teacher_params"] if "teacher_params" in df else pd.Series(math.nan, index=df.index)

    def size(t):
        known = sizes[df["teacher"] == t].dropna()
        return float(known.iloc[0]) if len(known) else math.inf

    return sorted(teachers, key=size)


# one colour per method in every table and figure (seaborn's colorblind palette; the student alone in grey)
COLOURS = {"ce": "#595959", "kd": "#0173B2", "dist": "#56B4E9", "dkd": "#029E73", "ctkd": "#CC78BC",
           "mkd": "#D55E00", "hard": "#CA9161"}
_SPARE = ["#DE8F05", "#FBAFE4", "#949494", "#ECE133", "#8C613C"]


def colour_of(method) -> str:
    """A method's colour: fixed for the built-ins, then a stable pick from the palette's rest by name."""
    if method in COLOURS:
        return COLOURS[method]
    return _SPARE[sum(map(ord, str(method))) % len(_SPARE)]
