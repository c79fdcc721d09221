"""CSV files as a float matrix: column types, one-hot categories, standardisation and missing values.

A :class:`TabularEncoder` is fitted on the training file and then applied, unchanged, to the training
and test files (training statistics only, so a test file never leaks into the encoding):

- a **numeric** column is standardised, (v − mean) / std with the training mean and standard deviation
  (a constant column keeps std 1). A missing value becomes the training mean (0 after standardising) and,
  when the training column has missing values, a 0/1 column ``"<name> missing"`` records where;
- a **categorical** column is one-hot encoded over its ``max_categories`` most frequent training values;
  rarer ones share an ``"(other)"`` column, and a missing value is its own category ``"(missing)"``.
  A test value never seen in training goes to ``"(other)"`` when there is one, else to no column;
- a column is numeric when most of its non-missing training values are numbers and the others are few
  (at most 10% of them, or at most 3); override with ``categorical=`` / ``numeric=``. Then every other
  value in it is an error that names the row, the column and the value: it is a typo, not a category;
- a column that names its rows rather than describing them is left out as an **identifier**: text values
  distinct in at least 95% of (20 or more) rows, or whole numbers each used once filling at least half of
  their range (a row counter). Naming it in ``categorical=`` or ``numeric=`` keeps it;
- the label column's distinct values are the classes (sorted numerically when they are all numbers).

Files are read with the standard library's ``csv`` module, ``chunk_size`` records at a time, in two
passes over the training file (types, categories and statistics; then the matrix) and two over a test
file (a count; then the matrix), so that memory holds little beyond the final matrix. Rows are numbered
from 1 for the first record after the header; ``line`` is the line of the file on which a record starts
(the header is line 1). Every problem raises :class:`~influencekit.core.errors.InputError` naming the file,
the row and line, the column and the value.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.checks import check_int
from ..core.errors import InputError, InputTypeError, NotFittedError
from ..core.progress import progress_bar

__all__ = [
    "DEFAULT_MISSING",
    "ColumnInfo",
    "TabularData",
    "TabularEncoder",
    "count_rows",
    "read_rows",
    "read_header",
    "read_column",
    "columns_hint",
]

DEFAULT_MISSING = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?")
NUMERIC_SHARE = 0.9  # a column is numeric when at least this share of its non-missing values are numbers,
_FEW_TYPOS = 3  # or when most are and at most this many are not (small files)
_MAX_DISTINCT = 1000  # distinct values counted per column in the first pass (bounds its memory)
_MAX_CLASSES = 100
IDENTIFIER_SHARE = 0.95  # a text column with distinct values in this share of its rows is an identifier
_MIN_IDENTIFIER_ROWS = 20
MISSING = "(missing)"
OTHER = "(other)"


# ------------------------------------------------------------------------------------------ reading
class _Reader:
    """The records of a CSV file after its header, as ``(row, line, fields)``; blank lines are skipped."""

    def __init__(self, path: str | os.PathLike, *, delimiter: str, name: str) -> None:
        self.path = Path(path)
        self.name = name
        if not self.path.is_file():
            raise InputError(f"`{name}` must be a CSV file. Got {str(self.path)!r}, which is not a file.")
        self._file = open(self.path, newline="", encoding="utf-8-sig")
        self._reader = csv.reader(self._file, delimiter=delimiter)
        self._last_line = 0
        first = self._next()
        if first is None:
            self.close()
            raise InputError(
                f"`{name}` ({self.path.name}) is empty: a CSV file needs a header row and at least one data row."
            )
        _, _, header = first
        self.header = [h.strip() or f"(column {j + 1})" for j, h in enumerate(header)]
        seen = Counter(self.header)
        dup = [h for h, c in seen.items() if c > 1]
        if dup:
            self.close()
            raise InputError(
                f"the header of `{name}` ({self.path.name}) must name each column once. Got {dup[:5]} more than once."
            )
        self.row = 0

    def _next(self) -> tuple[int, int, list[str]] | None:
        while True:
            start = self._last_line + 1
            try:
                fields = next(self._reader)
            except StopIteration:
                return None
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"`{self.name}` ({self.path.name}) must be UTF-8 text. Got bytes that are not UTF-8 "
                    f"({exc.reason}); "
                    "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
                ) from None
            except csv.Error as exc:
                raise InputError(
                    f"`{self.name}` ({self.path.name}), line {start}: the CSV cannot be parsed ({exc})."
                ) from None
            self._last_line = self._reader.line_num
            if fields and any(f.strip() for f in fields):
                return 0, start, fields

    def records(self) -> Iterator[tuple[int, int, list[str]]]:
        width = len(self.header)
        while True:
            record = self._next()
            if record is None:
                return
            self.row += 1
            _, line, fields = record
            if len(fields) != width:
                raise InputError(
                    f"`{self.name}` ({self.path.name}), row {self.row} (line {line}) has {len(fields)} fields but the "
                    "header "
                    f"has {width} columns; check the delimiter and the quoting of that line."
                )
            yield self.row, line, fields

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _as_float(text: str) -> float | None:
    """``text`` as a finite float, else ``None``."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def count_rows(path: str | os.PathLike, *, delimiter: str = ",", name: str = "data") -> int:
    """The number of data records after the header (blank lines are not records)."""
    with _Reader(path, delimiter=delimiter, name=name) as reader:
        n = 0
        for _ in reader.records():
            n += 1
    return n


def read_rows(
    path: str | os.PathLike, rows: Iterable[int], *, delimiter: str = ","
) -> tuple[list[str], dict[int, list[str]]]:
    """The header and the raw fields of the given data rows (numbered from 1), in one pass over the file."""
    wanted = set(int(r) for r in rows)
    out: dict[int, list[str]] = {}
    with _Reader(path, delimiter=delimiter, name="data") as reader:
        for row, _, fields in reader.records():
            if row in wanted:
                out[row] = fields
                if len(out) == len(wanted):
                    break
        return reader.header, out


def read_header(path: str | os.PathLike, *, delimiter: str = ",", name: str = "data") -> list[str]:
    """The column names of a CSV file (its header row), checked as every reader checks them."""
    with _Reader(path, delimiter=delimiter, name=name) as reader:
        return list(reader.header)


def read_column(path: str | os.PathLike, column: str, rows: Iterable[int], *, delimiter: str = ",") -> list[str]:
    """The raw, stripped values of ``column`` in the given data rows (numbered from 1), in the order of ``rows``."""
    wanted = [int(r) for r in rows]
    values: dict[int, str] = {}
    targets = set(wanted)
    with _Reader(path, delimiter=delimiter, name="data") as reader:
        at = reader.header.index(column)
        for row, _, fields in reader.records():
            if row in targets:
                values[row] = fields[at].strip()
                if len(values) == len(targets):
                    break
    return [values[r] for r in wanted]


# ------------------------------------------------------------------------------------------ results
@dataclass
class ColumnInfo:
    """How one column of the CSV is encoded.

    Attributes:
        name: the header name.
        kind: ``"numeric"``, ``"categorical"``, ``"empty"`` (no value in training: left out), ``"identifier"`` (a
            value per row, e.g. an ID or free text: left out, see :func:`_looks_like_identifier`) or ``"ignored"``.
        position: the column's index in the header.
        n_missing: missing values in the training rows.
        n_numbers: non-missing training values that are numbers.
        mean, scale: numeric columns: (v − mean) / scale; a missing value is imputed by ``mean``.
        indicator: numeric columns: whether a ``"<name> missing"`` 0/1 feature is added.
        categories: categorical columns: the one-hot columns in order (``"(other)"``, ``"(missing)"`` included).
        n_distinct: distinct non-missing training values (counting stops at 1,000: ``n_distinct_capped``).
        features: the positions of this column's features in the matrix.
        n_present: non-missing training values.
    """

    name: str
    kind: str
    position: int
    n_missing: int = 0
    n_numbers: int = 0
    mean: float = 0.0
    scale: float = 1.0
    indicator: bool = False
    categories: tuple[str, ...] = ()
    n_distinct: int = 0
    n_distinct_capped: bool = False
    constant: bool = False
    features: tuple[int, ...] = ()
    n_present: int = 0

    def describe(self) -> str:
        """One line on how the column is encoded and how its missing values are handled."""
        if self.kind == "numeric":
            text = f"numeric, standardised with training mean {self.mean:.4g} and std {self.scale:.4g}"
            if self.constant:
                text += " (constant in training)"
            if self.n_missing:
                text += f"; {self.n_missing} missing imputed by the mean, with a 0/1 column '{self.name} missing'"
            return text
        if self.kind == "categorical":
            named = [c for c in self.categories if c not in (OTHER, MISSING)]
            text = f"categorical, one-hot over {len(named)} values"
            if OTHER in self.categories:
                more = "more than " if self.n_distinct_capped else ""
                text += f" (the most frequent of {more}{self.n_distinct}; the rest share '{OTHER}')"
            if self.n_missing:
                text += f"; {self.n_missing} missing as their own category '{MISSING}'"
            return text
        if self.kind == "empty":
            return "left out: no value in the training rows"
        if self.kind == "identifier":
            return (
                f"left out: looks like an identifier ({self.n_distinct} distinct values in {self.n_present} "
                f"rows); name it in `categorical=`/`numeric=` (--categorical/--numeric) to use it as a feature"
            )
        return "left out (ignored)"


@dataclass
class TabularData:
    """An encoded CSV file.

    Attributes:
        X: ``(n, n_features)`` float64 features.
        y: ``(n,)`` int64 class indices into the encoder's ``classes_``.
        rows: ``(n,)`` the data-row number of each example in the file (1 = first record after the header).
        lines: ``(n,)`` the file line on which each record starts (the header is line 1).
        path: the file read.
        missing: column -> number of missing values in these rows (imputed as the encoder says).
        unseen: column -> number of categorical values not seen in training (sent to ``"(other)"`` or to no column).
    """

    X: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    lines: np.ndarray
    path: Path
    missing: dict[str, int] = field(default_factory=dict)
    unseen: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, y)`` as float64 and long tensors sharing memory with the arrays."""
        return torch.from_numpy(self.X), torch.from_numpy(self.y)


class _Stats:
    """First-pass statistics of one column (Welford's running mean and variance, in file order)."""

    __slots__ = ("missing", "numbers", "mean", "m2", "bad", "first_bad", "counts", "capped", "integers", "low", "high")

    def __init__(self) -> None:
        self.missing = 0
        self.numbers = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.bad = 0
        self.first_bad: tuple[int, int, str] | None = None
        self.counts: Counter[str] = Counter()
        self.capped = False
        self.integers = True  # every number so far is a whole number
        self.low = math.inf
        self.high = -math.inf

    def add(self, text: str, row: int, line: int, raw: str, missing: frozenset[str]) -> None:
        """Count one training value: ``text`` stripped, ``raw`` as in the file (for the first non-number's message)."""
        if text in missing:
            self.missing += 1
            return
        if text in self.counts:
            self.counts[text] += 1
        elif len(self.counts) < _MAX_DISTINCT:
            self.counts[text] = 1
        else:
            self.capped = True
        value = _as_float(text)
        if value is None:
            self.bad += 1
            if self.first_bad is None:
                self.first_bad = (row, line, raw)
            return
        self.numbers += 1
        self.integers = self.integers and float(value).is_integer()
        self.low, self.high = min(self.low, value), max(self.high, value)
        delta = value - self.mean
        self.mean += delta / self.numbers
        self.m2 += delta * (value - self.mean)


# ------------------------------------------------------------------------------------------ first pass: types,
# statistics
def _scan(
    reader: _Reader,
    label_at: int,
    used: list[int],
    rows: np.ndarray | None,
    *,
    label: str,
    missing: frozenset[str],
    chunk_size: int,
    progress: bool,
) -> tuple[dict[int, _Stats], Counter[str], int]:
    """Read the training records once: per used column its :class:`_Stats`, the label counts, and the number of rows."""
    stats = {j: _Stats() for j in used}
    labels: Counter[str] = Counter()
    with closing(
        progress_bar(total=None, desc=f"reading {reader.path.name} (types, statistics)", enabled=progress)
    ) as bar:
        n = 0
        for row, line, fields in reader.records():
            if rows is not None and (row > len(rows) or not rows[row - 1]):
                continue
            n += 1
            y = fields[label_at].strip()
            if y in missing:
                raise InputError(
                    f"`data` ({reader.path.name}), row {row} (line {line}): the label column {label!r} is missing "
                    f"({fields[label_at]!r}). Every training row needs a label; fill it in or remove the row."
                )
            labels[y] += 1
            for j in used:
                stats[j].add(fields[j].strip(), row, line, fields[j], missing)
            if n % chunk_size == 0:
                bar.update(chunk_size)
    return stats, labels, n


def _ordered_classes(labels: Counter[str], label: str, file: str) -> list[str]:
    """The label column's distinct values as classes, sorted numerically when they are all numbers."""
    if len(labels) < 2:
        raise InputError(
            f"the label column {label!r} of {file} must hold at least two classes. Got only {sorted(labels)}."
        )
    if len(labels) > _MAX_CLASSES:
        raise InputError(
            f"the label column {label!r} of {file} has {len(labels)} distinct values; classification supports at "
            f"most {_MAX_CLASSES} classes. Is {label!r} the right column (a continuous target is not a label)?"
        )
    numbers = {v: _as_float(v) for v in labels}
    if all(x is not None for x in numbers.values()):
        return sorted(labels, key=lambda v: (numbers[v], v))
    return sorted(labels)


def _plan_columns(
    header: list[str],
    file: str,
    used: list[int],
    stats: dict[int, _Stats],
    *,
    label: str,
    numeric: Sequence[str],
    categorical: Sequence[str],
    max_categories: int,
) -> tuple[list[ColumnInfo], list[str]]:
    """Each used column's kind and encoding from its first-pass statistics, and the names of the features."""
    columns: list[ColumnInfo] = []
    names: list[str] = []
    for j in used:
        s, name = stats[j], header[j]
        present = s.numbers + s.bad
        info = ColumnInfo(
            name,
            "",
            j,
            n_missing=s.missing,
            n_numbers=s.numbers,
            n_distinct=len(s.counts),
            n_distinct_capped=s.capped,
            n_present=present,
        )
        if present == 0:
            info.kind = "empty"
            columns.append(info)
            continue
        few_bad = s.numbers > s.bad and (s.bad <= (1 - NUMERIC_SHARE) * present or s.bad <= _FEW_TYPOS)
        if (
            name not in numeric
            and name not in categorical
            and _looks_like_identifier(s, present, numeric_column=few_bad)
        ):
            info.kind = "identifier"
            columns.append(info)
            continue
        if name in numeric or (name not in categorical and few_bad):
            _plan_numeric(info, s, present, file, names)
        else:
            _plan_categorical(info, s, max_categories, names)
        columns.append(info)
    if not names:
        raise InputError(
            f"{file} has no feature column with a value besides the label {label!r}: there is nothing to learn from."
        )
    return columns, names


def _looks_like_identifier(s: _Stats, present: int, *, numeric_column: bool) -> bool:
    """A column that names its rows rather than describing them: text values distinct in at least
    ``IDENTIFIER_SHARE`` of the rows, or whole numbers each used once that fill at least half of their range (a row
    counter, also after a held-out split).
    Needs at least ``_MIN_IDENTIFIER_ROWS`` values; a column named in ``categorical=``/``numeric=`` is never one."""
    if present < _MIN_IDENTIFIER_ROWS or s.capped:
        return False
    if numeric_column:
        return s.bad == 0 and s.integers and len(s.counts) == present and s.high - s.low + 1 <= 2 * present
    return len(s.counts) >= IDENTIFIER_SHARE * present


def _plan_numeric(info: ColumnInfo, s: _Stats, present: int, file: str, names: list[str]) -> None:
    """A numeric column: standardisation from the training mean and std, a missing-value indicator if needed."""
    name = info.name
    if s.bad:
        row, line, value = s.first_bad  # type: ignore[misc]
        more = f" ({s.bad - 1} more non-numbers in this column)" if s.bad > 1 else ""
        raise InputError(
            f"`data` ({file}), row {row} (line {line}), column {name!r}: {value!r} is not a number, but the column "
            f"is numeric ({s.numbers} of {present} values are numbers){more}. Fix the value, leave it empty to "
            f"mark it missing, or declare the column categorical (`categorical=` / --categorical {name})."
        )
    info.kind = "numeric"
    info.mean = s.mean
    std = math.sqrt(s.m2 / s.numbers) if s.numbers else 0.0
    info.scale = std if std > 0 else 1.0
    info.constant = not std > 0
    info.indicator = s.missing > 0
    start = len(names)
    names.append(name)
    if info.indicator:
        names.append(f"{name} missing")
    info.features = tuple(range(start, len(names)))


def _plan_categorical(info: ColumnInfo, s: _Stats, max_categories: int, names: list[str]) -> None:
    """A categorical column: one-hot over its most frequent values, then ``(other)`` and ``(missing)`` when needed."""
    info.kind = "categorical"
    ranked = sorted(s.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = [v for v, _ in ranked[:max_categories]]
    cats = kept + ([OTHER] if (len(ranked) > len(kept) or s.capped) else []) + ([MISSING] if s.missing else [])
    info.categories = tuple(cats)
    start = len(names)
    names.extend(f"{info.name}={c}" for c in cats)
    info.features = tuple(range(start, len(names)))


# ------------------------------------------------------------------------------------------ second pass: the matrix
def _encode_labels(
    chunk: list[tuple[int, int, list[str]]],
    y: np.ndarray,
    label_at: int,
    class_index: dict[str, int],
    classes: list[str],
    label: str,
    nulls: frozenset[str],
    file: str,
    name: str,
) -> None:
    for i, (row, line, fields) in enumerate(chunk):
        text = fields[label_at].strip()
        k = class_index.get(text)
        if k is None:
            what = "missing" if text in nulls else f"{fields[label_at]!r}, a class not in the training data"
            raise InputError(
                f"`{name}` ({file}), row {row} (line {line}): the label {label!r} is {what}. The training classes are "
                f"{_list(classes)}; fix the label or remove the row."
            )
        y[i] = k


def _encode_numeric(
    col: ColumnInfo,
    j: int,
    chunk: list[tuple[int, int, list[str]]],
    X: np.ndarray,
    nulls: frozenset[str],
    missing: Counter[str],
    file: str,
    name: str,
) -> None:
    texts = [fields[j].strip() for _, _, fields in chunk]
    values = np.empty(len(chunk), dtype=np.float64)
    absent = np.zeros(len(chunk), dtype=bool)
    for i, text in enumerate(texts):
        if text in nulls:
            absent[i] = True
            values[i] = col.mean
            continue
        value = _as_float(text)
        if value is None:
            row, line, fields = chunk[i]
            raise InputError(
                f"`{name}` ({file}), row {row} (line {line}), column {col.name!r}: {fields[j]!r} is not a number, "
                "but the column is numeric in the training data. Fix the value or leave it empty to mark it missing."
            )
        values[i] = value
    X[:, col.features[0]] = (values - col.mean) / col.scale
    if col.indicator:
        X[:, col.features[1]] = absent
    if absent.any():
        missing[col.name] += int(absent.sum())


def _encode_categorical(
    col: ColumnInfo,
    j: int,
    chunk: list[tuple[int, int, list[str]]],
    X: np.ndarray,
    nulls: frozenset[str],
    missing: Counter[str],
    unseen: Counter[str],
) -> None:
    texts = [fields[j].strip() for _, _, fields in chunk]
    index = {c: col.features[0] + t for t, c in enumerate(col.categories)}
    other = index.get(OTHER)
    for i, text in enumerate(texts):
        if text in nulls:
            missing[col.name] += 1
            f = index.get(MISSING, other)  # no missing value in training: treated as an unseen value
        else:
            f = index.get(text)
            if f is None:
                unseen[col.name] += 1
                f = other
        if f is not None:
            X[i, f] = 1.0


# ------------------------------------------------------------------------------------------ encoder
class TabularEncoder:
    """Encode the columns of a CSV file as float features and its label column as class indices.

    Args:
        label: the name of the label column.
        categorical: columns to treat as categories even when their values are numbers (e.g. codes).
        numeric: columns to treat as numbers even when few of their values are (every other value is an error).
        ignore: columns to leave out (identifiers, free text, leaked targets).
        missing_values: the texts that mean "missing" (after stripping spaces).
        max_categories: one-hot columns per categorical column at most; rarer values share ``"(other)"``.
        delimiter: the field separator.
        chunk_size: records converted at a time (memory for one chunk; results do not depend on it).
        progress: show progress bars while reading.

    Learned state (after :meth:`fit`): ``header_``, ``columns_`` (:class:`ColumnInfo` per used column),
    ``classes_`` (label values, index = class), ``label_counts_``, ``feature_names_``, ``n_rows_``.
    """

    def __init__(
        self,
        label: str,
        *,
        categorical: Sequence[str] = (),
        numeric: Sequence[str] = (),
        ignore: Sequence[str] = (),
        missing_values: Sequence[str] = DEFAULT_MISSING,
        max_categories: int = 30,
        delimiter: str = ",",
        chunk_size: int = 10_000,
        progress: bool = False,
    ) -> None:
        if not isinstance(label, str) or not label:
            raise InputTypeError(f"`label` must be the name of a column (a non-empty string). Got {label!r}.")
        self.label = label
        self.categorical = tuple(categorical)
        self.numeric = tuple(numeric)
        self.ignore = tuple(ignore)
        both = set(self.categorical) & set(self.numeric)
        if both:
            raise InputError(f"a column cannot be both `categorical` and `numeric`. Got {sorted(both)} in both.")
        if label in self.ignore or label in self.categorical or label in self.numeric:
            raise InputError(f"the label column {label!r} must not be listed in `categorical`, `numeric` or `ignore`.")
        self.missing_values = frozenset(str(m).strip() for m in missing_values)
        self.max_categories = check_int("max_categories", max_categories, low=1)
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise InputError(f"`delimiter` must be one character. Got {delimiter!r}.")
        self.delimiter = delimiter
        self.chunk_size = check_int("chunk_size", chunk_size, low=1)
        self.progress = progress

    # -------------------------------------------------------------------------------------- fit
    def fit(self, path: str | os.PathLike, *, rows: np.ndarray | None = None) -> TabularEncoder:
        """Read the training file once: column types, categories, means and standard deviations, classes.

        Args:
            path: the training CSV.
            rows: optional boolean mask ``(n_records,)`` of the records that are training rows (the others,
                e.g. a held-out split, do not contribute to any statistic).
        """
        with _Reader(path, delimiter=self.delimiter, name="data") as reader:
            header = reader.header
            label_at = self._label_position(header, reader)
            for option in ("categorical", "numeric", "ignore"):
                unknown = [c for c in getattr(self, option) if c not in header]
                if unknown:
                    raise InputError(
                        f"`{option}` names {unknown} but {reader.path.name} has no such column; "
                        f"{columns_hint(unknown[0], header)}"
                    )
            used = [j for j, h in enumerate(header) if j != label_at and h not in self.ignore]
            stats, labels, n = _scan(
                reader,
                label_at,
                used,
                rows,
                label=self.label,
                missing=self.missing_values,
                chunk_size=self.chunk_size,
                progress=self.progress,
            )
            if rows is not None and len(rows) != reader.row:
                raise InputError(
                    f"`rows` must be a mask over the {reader.row} records of {reader.path.name}. Got {len(rows)} "
                    "entries."
                )
            if n == 0:
                raise InputError(
                    f"`data` ({reader.path.name}) has a header but no data rows: there is nothing to train on."
                )
            self._build(header, reader.path.name, used, stats, labels)
        self.header_ = header
        self.label_position_ = label_at
        self.n_rows_ = n
        return self

    def _label_position(self, header: list[str], reader: _Reader) -> int:
        if self.label not in header:
            raise InputError(
                f"`label` must name a column of {reader.path.name}. Got {self.label!r}; "
                f"{columns_hint(self.label, header)}"
            )
        return header.index(self.label)

    def _build(
        self, header: list[str], file: str, used: list[int], stats: dict[int, _Stats], labels: Counter[str]
    ) -> None:
        self.classes_ = _ordered_classes(labels, self.label, file)
        self.label_counts_ = {c: labels[c] for c in self.classes_}
        self._class_index = {c: i for i, c in enumerate(self.classes_)}
        self.columns_, self.feature_names_ = _plan_columns(
            header,
            file,
            used,
            stats,
            label=self.label,
            numeric=self.numeric,
            categorical=self.categorical,
            max_categories=self.max_categories,
        )

    # -------------------------------------------------------------------------------------- transform
    def transform(self, path: str | os.PathLike, *, rows: np.ndarray | None = None, name: str = "test") -> TabularData:
        """Encode a file with the fitted columns, ``chunk_size`` records at a time into one preallocated matrix.

        Args:
            path: a CSV file with the training file's feature columns and label column (any order; other
                columns are not read).
            rows: optional boolean mask over the file's records: encode only those.
            name: how error messages call the file (``"data"``, ``"test"``).
        """
        if not hasattr(self, "columns_"):
            raise NotFittedError("this TabularEncoder is not fitted yet. Call .fit(train_csv) first.")
        if rows is not None:
            rows = np.asarray(rows, dtype=bool)
            n = int(rows.sum())
        else:
            n = count_rows(path, delimiter=self.delimiter, name=name)
        with _Reader(path, delimiter=self.delimiter, name=name) as reader:
            file = reader.path.name
            if n == 0:
                raise InputError(f"`{name}` ({file}) has a header but no data rows.")
            label_at = self._label_position(reader.header, reader)
            absent = [
                c.name for c in self.columns_ if c.kind in ("numeric", "categorical") and c.name not in reader.header
            ]
            if absent:
                raise InputError(
                    f"`{name}` ({file}) must have the training columns. Got no column {absent[:5]}; its columns are "
                    f"{_list(reader.header)}."
                )
            position = {
                c.name: reader.header.index(c.name) for c in self.columns_ if c.kind in ("numeric", "categorical")
            }
            X = np.zeros((n, len(self.feature_names_)), dtype=np.float64)
            y = np.empty(n, dtype=np.int64)
            row_no = np.empty(n, dtype=np.int64)
            line_no = np.empty(n, dtype=np.int64)
            missing: Counter[str] = Counter()
            unseen: Counter[str] = Counter()
            with closing(progress_bar(total=n, desc=f"encoding {file}", enabled=self.progress)) as bar:
                chunk: list[tuple[int, int, list[str]]] = []
                at = 0
                for record in reader.records():
                    if rows is not None and (record[0] > len(rows) or not rows[record[0] - 1]):
                        continue
                    chunk.append(record)
                    if len(chunk) == self.chunk_size:
                        self._encode(
                            chunk,
                            X[at : at + len(chunk)],
                            y[at : at + len(chunk)],
                            label_at,
                            position,
                            missing,
                            unseen,
                            file,
                            name,
                        )
                        row_no[at : at + len(chunk)] = [r for r, _, _ in chunk]
                        line_no[at : at + len(chunk)] = [ln for _, ln, _ in chunk]
                        at += len(chunk)
                        bar.update(len(chunk))
                        chunk = []
                if chunk:
                    self._encode(
                        chunk,
                        X[at : at + len(chunk)],
                        y[at : at + len(chunk)],
                        label_at,
                        position,
                        missing,
                        unseen,
                        file,
                        name,
                    )
                    row_no[at : at + len(chunk)] = [r for r, _, _ in chunk]
                    line_no[at : at + len(chunk)] = [ln for _, ln, _ in chunk]
                    at += len(chunk)
                    bar.update(len(chunk))
            if rows is not None and len(rows) != reader.row:
                raise InputError(
                    f"`rows` must be a mask over the {reader.row} records of {file}. Got {len(rows)} entries."
                )
        if at != n:  # the file changed between the count and the read
            raise InputError(
                f"`{name}` ({file}) changed while it was read ({n} records counted, {at} read); read it again."
            )
        return TabularData(X, y, row_no, line_no, Path(path), dict(missing), dict(unseen))

    def fit_transform(self, path: str | os.PathLike, *, rows: np.ndarray | None = None) -> TabularData:
        """:meth:`fit` then :meth:`transform` of the same rows (two passes over the file)."""
        self.fit(path, rows=rows)
        if rows is None:
            rows = np.ones(self.n_rows_, dtype=bool)
        return self.transform(path, rows=rows, name="data")

    def _encode(
        self,
        chunk: list[tuple[int, int, list[str]]],
        X: np.ndarray,
        y: np.ndarray,
        label_at: int,
        position: dict[str, int],
        missing: Counter[str],
        unseen: Counter[str],
        file: str,
        name: str,
    ) -> None:
        nulls = self.missing_values
        _encode_labels(chunk, y, label_at, self._class_index, self.classes_, self.label, nulls, file, name)
        for col in self.columns_:
            if col.kind == "numeric":
                _encode_numeric(col, position[col.name], chunk, X, nulls, missing, file, name)
            elif col.kind == "categorical":
                _encode_categorical(col, position[col.name], chunk, X, nulls, missing, unseen)

    # -------------------------------------------------------------------------------------- describe
    @property
    def identifiers_(self) -> list[ColumnInfo]:
        """The columns left out as identifiers (see :func:`_looks_like_identifier`)."""
        if not hasattr(self, "columns_"):
            raise NotFittedError("this TabularEncoder is not fitted yet. Call .fit(train_csv) first.")
        return [c for c in self.columns_ if c.kind == "identifier"]

    def summary(self) -> list[dict[str, Any]]:
        """One dict per column of the training file: name, kind, missing count, and how it is encoded."""
        if not hasattr(self, "columns_"):
            raise NotFittedError("this TabularEncoder is not fitted yet. Call .fit(train_csv) first.")
        out = [
            {
                "column": self.label,
                "kind": "label",
                "missing": 0,
                "encoding": f"{len(self.classes_)} classes: {_list(self.classes_)}",
            }
        ]
        for c in self.columns_:
            out.append({"column": c.name, "kind": c.kind, "missing": c.n_missing, "encoding": c.describe()})
        for name in self.ignore:
            out.append({"column": name, "kind": "ignored", "missing": 0, "encoding": "left out (ignored)"})
        return out


def columns_hint(wanted: str, header: Sequence[str]) -> str:
    """Every column of ``header`` and the closest to ``wanted`` (a misspelled name gets its fix)."""
    import difflib

    close = difflib.get_close_matches(wanted, list(header), n=1, cutoff=0.6)
    return f"the columns are {_list(header, limit=len(header))}" + (f"; did you mean {close[0]!r}?" if close else "")


def _list(values: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"
