"""UCI "Diabetes 130-US hospitals 1999–2008" (Strack et al. 2014), read from the zip as distributed.

``dataset_diabetes.zip`` holds ``dataset_diabetes/diabetic_data.csv``: 101,766 hospital encounters of
diabetic patients, 50 columns, ``?`` for a missing value, and the outcome ``readmitted`` (``NO``, ``>30``
or ``<30`` days). The CSV is streamed straight out of the zip with :mod:`zipfile` and :mod:`csv` (nothing
is extracted); an extracted ``diabetic_data.csv`` works too. Koh & Liang (2017, §5.3) use it to debug a
domain mismatch with influence functions.

Featurisation — the one of the paper's code (``scripts/hospital_readmission.ipynb`` of its release),
which gives its **127 features**:

- 8 count columns as numbers: ``time_in_hospital``, ``num_lab_procedures``, ``num_procedures``,
  ``num_medications``, ``number_outpatient``, ``number_emergency``, ``number_inpatient``,
  ``number_diagnoses`` (raw counts here; :func:`~influencekit_paper.mismatch.run_readmission`
  standardises them with training statistics);
- 31 categorical columns one-hot encoded over the values that occur in the file, in sorted order:
  demographics (``gender``, ``race``, ``age`` — ten decades ``[0-10)`` … ``[90-100)``), the discharge
  disposition, the two lab results (``max_glu_serum``, ``A1Cresult``; ``None`` = not measured is a value,
  not a missing one), the 23 medication columns (``No``/``Steady``/``Up``/``Down``), ``change`` and
  ``diabetesMed``. A column with exactly two values becomes a single 0/1 feature (for the second value),
  as ``pandas.get_dummies(drop_first=True)`` does in the paper's code; a column with one value keeps its
  one (constant) feature. ``race = ?`` is its own category ``race=?``.
- left out, as in the paper: identifiers (``encounter_id``, ``patient_nbr``), ``weight`` (97% missing),
  ``payer_code`` and ``medical_specialty`` (about half missing), ``admission_type_id`` and
  ``admission_source_id`` (partly redundant with the discharge code), and the three ICD-9 diagnosis codes
  (``diag_1..3``: ~700 distinct codes each, which would swamp the 127 features).

Label: ``readmitted == "<30"`` (readmitted within 30 days; 11,357 positives) by default — what the
paper's code does (``pd.Categorical`` codes the sorted values ``<30``, ``>30``, ``NO`` as 0, 1, 2 and only
code 0 becomes positive); its counts match the paper's "3 of 24 children readmitted". ``label="any"``
counts ``>30`` as readmitted too (46,902 positives).
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from influencekit.core.errors import InputError

__all__ = [
    "ZIP_NAME",
    "CSV_NAME",
    "NUMERIC_COLUMNS",
    "CATEGORICAL_COLUMNS",
    "Readmission",
    "load_readmission",
]

ZIP_NAME = "dataset_diabetes.zip"
CSV_NAME = "diabetic_data.csv"
NUMERIC_COLUMNS = (
    "time_in_hospital",
    "num_lab_procedures",
    "num_procedures",
    "num_medications",
    "number_outpatient",
    "number_emergency",
    "number_inpatient",
    "number_diagnoses",
)
MEDICATIONS = (
    "metformin",
    "repaglinide",
    "nateglinide",
    "chlorpropamide",
    "glimepiride",
    "acetohexamide",
    "glipizide",
    "glyburide",
    "tolbutamide",
    "pioglitazone",
    "rosiglitazone",
    "acarbose",
    "miglitol",
    "troglitazone",
    "tolazamide",
    "examide",
    "citoglipton",
    "insulin",
    "glyburide-metformin",
    "glipizide-metformin",
    "glimepiride-pioglitazone",
    "metformin-rosiglitazone",
    "metformin-pioglitazone",
)
CATEGORICAL_COLUMNS = (
    "gender",
    "race",
    "age",
    "discharge_disposition_id",
    "max_glu_serum",
    "A1Cresult",
    *MEDICATIONS,
    "change",
    "diabetesMed",
)
_INTEGER_CODED = ("discharge_disposition_id",)  # sorted as numbers, as pandas does with an int column
_LABELS = {"<30": ("<30",), "any": ("<30", ">30")}
_OUTCOMES = ("NO", ">30", "<30")
_EXPECTED = (
    f"the UCI 'Diabetes 130-US hospitals' data: {ZIP_NAME} as distributed (holding dataset_diabetes/{CSV_NAME}), "
    f"the extracted {CSV_NAME}, or a folder holding either"
)


@dataclass
class Readmission:
    """The encounters of the diabetes data as features for readmission prediction.

    Attributes:
        X: ``(n, 127)`` float64 features (count columns as raw numbers, one-hot columns 0/1).
        y: ``(n,)`` long labels, 1 = readmitted (within 30 days, or at all with ``label="any"``).
        feature_names: ``(127,)`` names: the count column's name, or ``"column=value"`` for a one-hot feature.
        numeric: positions in ``X`` of the count columns (the ones to standardise).
        age: ``(n,)`` the age group of each encounter (``"[0-10)"`` … ``"[90-100)"``).
        admission_source: ``(n,)`` the raw ``admission_source_id`` of each encounter (``"7"`` = emergency room; not a
        feature).
        readmitted: ``(n,)`` the raw outcome (``"NO"``, ``">30"``, ``"<30"``).
        encounter_id, patient_nbr: ``(n,)`` int64 identifiers (a patient may have several encounters).
        label: which outcomes count as readmitted (``"<30"`` or ``"any"``).
        source: the file read (``zip!member`` inside a zip).
    """

    X: torch.Tensor
    y: torch.Tensor
    feature_names: list[str]
    numeric: list[int]
    age: np.ndarray
    admission_source: np.ndarray
    readmitted: np.ndarray
    encounter_id: np.ndarray
    patient_nbr: np.ndarray
    label: str
    source: str

    def __len__(self) -> int:
        return len(self.y)

    def feature_index(self, name: str) -> int:
        """The column of ``X`` named ``name`` (e.g. ``"age=[0-10)"``)."""
        try:
            return self.feature_names.index(name)
        except ValueError:
            raise InputError(
                f"`name` must be one of the {len(self.feature_names)} feature names (e.g. 'age=[0-10)'). Got {name!r}."
            ) from None


def _locate(path: str | os.PathLike) -> tuple[Path, str | None]:
    """The file to read and, for a zip, the CSV member inside it."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / ZIP_NAME, path / CSV_NAME, path / "dataset_diabetes" / CSV_NAME):
            if candidate.is_file():
                return _locate(candidate)
        raise InputError(f"the folder {str(path)!r} holds neither {ZIP_NAME} nor {CSV_NAME}: pass {_EXPECTED}.")
    if not path.is_file():
        raise InputError(f"`path` must be {_EXPECTED}. Got {str(path)!r}, which does not exist.")
    if not zipfile.is_zipfile(path):
        return path, None
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if Path(m).name == CSV_NAME and not m.startswith("__MACOSX")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{str(path)!r} is not a readable zip archive ({exc}); expected {ZIP_NAME}.") from None
    if not members:
        raise InputError(f"the zip {str(path)!r} holds no {CSV_NAME}: pass {_EXPECTED}.")
    return path, members[0]


@contextmanager
def _open_text(path: Path, member: str | None) -> Iterator[IO[str]]:
    if member is None:
        with open(path, newline="", encoding="utf-8") as f:
            yield f
        return
    with zipfile.ZipFile(path) as archive, archive.open(member) as raw:
        yield io.TextIOWrapper(raw, encoding="utf-8", newline="")


def load_readmission(path: str | os.PathLike, *, label: str = "<30", dtype: torch.dtype = torch.float64) -> Readmission:
    """Read the diabetes encounters and encode them as the paper's 127 features (see the module docstring).

    Args:
        path: ``dataset_diabetes.zip`` (read in place), an extracted ``diabetic_data.csv``, or a folder holding either.
        label: ``"<30"`` (readmitted within 30 days, the paper's label) or ``"any"`` (``<30`` or ``>30``).
        dtype: the floating dtype of ``X``.

    Categories are the values that occur in the file (no label is looked at), so the features do not depend
    on a train/test split. Raises :class:`~influencekit.core.errors.InputError` naming the file, the line and
    the column for a missing column, a short row, a count that is not an integer or an unknown outcome.
    """
    if label not in _LABELS:
        raise InputError(f"`label` must be '<30' (readmitted within 30 days, the paper's) or 'any'. Got {label!r}.")
    file, member = _locate(path)
    source = f"{file}!{member}" if member else str(file)
    name = member or file.name
    columns, lines = _read_columns(file, member, name)
    n = len(columns["readmitted"])
    if n == 0:
        raise InputError(f"{name} has a header but no data rows.")

    outcome = np.array(columns["readmitted"])
    unknown = sorted(set(np.unique(outcome).tolist()) - set(_OUTCOMES))
    if unknown:
        line = lines[int(np.flatnonzero(outcome == unknown[0])[0])]
        raise InputError(f"{name}, line {line}: `readmitted` must be one of {list(_OUTCOMES)}. Got {unknown[0]!r}.")

    X, names, numeric = _features(columns, name, lines, dtype)
    y = torch.as_tensor(np.isin(outcome, _LABELS[label]).astype(np.int64))
    return Readmission(
        X=X,
        y=y,
        feature_names=names,
        numeric=numeric,
        age=np.array(columns["age"]),
        admission_source=np.array(columns["admission_source_id"]),
        readmitted=outcome,
        encounter_id=_integers(columns["encounter_id"], "encounter_id", name, lines),
        patient_nbr=_integers(columns["patient_nbr"], "patient_nbr", name, lines),
        label=label,
        source=source,
    )


def _read_columns(file: Path, member: str | None, name: str) -> tuple[dict[str, list[str]], list[int]]:
    """The raw (stripped) texts of the columns used, and the file line of each record."""
    wanted = (
        "encounter_id",
        "patient_nbr",
        *NUMERIC_COLUMNS,
        *CATEGORICAL_COLUMNS,
        "admission_source_id",
        "readmitted",
    )
    columns: dict[str, list[str]] = {c: [] for c in wanted}
    lines: list[int] = []
    with _open_text(file, member) as text:
        reader = csv.reader(text)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise InputError(f"{name} is empty: expected {CSV_NAME} with a header row of 50 columns.") from None
        except UnicodeDecodeError:
            raise InputError(f"{name} is not UTF-8 text: expected {CSV_NAME}.") from None
        absent = [c for c in wanted if c not in header]
        if absent:
            raise InputError(
                f"{name} lacks the column(s) {absent[:6]}{' ...' if len(absent) > 6 else ''}: expected the 50 columns "
                "of the "
                f"UCI {CSV_NAME} (encounter_id, patient_nbr, race, gender, age, ..., readmitted)."
            )
        at = [header.index(c) for c in wanted]
        width = len(header)
        try:
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != width:
                    raise InputError(
                        f"{name}, line {reader.line_num}: {len(fields)} fields where the header has {width}; the file "
                        "is cut "
                        f"or is not the UCI {CSV_NAME}."
                    )
                for c, j in zip(wanted, at):
                    columns[c].append(fields[j].strip())
                lines.append(reader.line_num)
        except UnicodeDecodeError:
            raise InputError(f"{name} is not UTF-8 text: expected {CSV_NAME}.") from None
        except csv.Error as exc:
            raise InputError(f"{name}, line {reader.line_num}: the CSV cannot be parsed ({exc}).") from None
    return columns, lines


def _features(
    columns: dict[str, list[str]], name: str, lines: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, list[str], list[int]]:
    """The 127 features (count columns as numbers, then the one-hot columns), their names and the count positions."""
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for c in NUMERIC_COLUMNS:
        blocks.append(_integers(columns[c], c, name, lines)[:, None].astype(np.float64))
        names.append(c)
    numeric = list(range(len(names)))
    for c in CATEGORICAL_COLUMNS:
        values = np.array(columns[c])
        categories = sorted(set(values.tolist()))
        if c in _INTEGER_CODED and all(v.isdigit() for v in categories):
            categories.sort(key=int)
        if len(categories) == 2:
            categories = categories[1:]
        blocks.append((values[:, None] == np.array(categories)[None, :]).astype(np.float64))
        names.extend(f"{c}={v}" for v in categories)
    X = torch.as_tensor(np.concatenate(blocks, axis=1), dtype=dtype)
    return X, names, numeric


def _integers(texts: list[str], column: str, name: str, lines: list[int]) -> np.ndarray:
    try:
        return np.array(texts, dtype=np.int64)
    except ValueError:
        for row, text in enumerate(texts):
            try:
                int(text)
            except ValueError:
                raise InputError(f"{name}, line {lines[row]}, column {column!r}: {text!r} is not an integer.") from None
        raise
