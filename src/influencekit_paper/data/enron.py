"""Enron-Spam, Enron1 (Metsis, Androutsopoulos & Paliouras, CEAS 2006), read from the tarball as distributed.

``enron1.tar.gz`` holds ``enron1/ham/*.ham.txt`` (3,672 e-mails) and ``enron1/spam/*.spam.txt`` (1,500),
one pre-tokenised, lower-cased e-mail per file, plus ``enron1/Summary.txt``. The e-mails are read
straight from the compressed tarball (nothing is extracted). Koh & Liang (2017, §5.4) use it for
mislabel detection with bag-of-words logistic regression.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from influencekit.core.checks import check_int
from influencekit.core.errors import InputError

__all__ = ["EnronSpam", "read_enron", "load_enron"]

TARBALL = "enron1.tar.gz"


@dataclass
class EnronSpam:
    """Bag-of-words features of Enron1.

    Attributes:
        X: ``(n, n_words)`` word-presence features (1.0 when the word occurs in the e-mail, else 0.0).
        y: ``(n,)`` long labels, 1 = spam, 0 = ham.
        vocabulary: ``(n_words,)`` the words of the columns of ``X``.
        names: ``(n,)`` the e-mails' file names inside the tarball.
        min_df: the least number of e-mails a word had to occur in to become a feature.
    """

    X: torch.Tensor
    y: torch.Tensor
    vocabulary: list[str]
    names: list[str]
    min_df: int


def _tarball(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / TARBALL
        if not candidate.is_file():
            raise InputError(
                f"the folder {str(path)!r} has no {TARBALL}: pass the Enron-Spam Enron1 tarball as distributed "
                f"(Metsis et al. 2006, 'preprocessed' version) or the folder that holds it."
            )
        return candidate
    if not path.is_file():
        raise InputError(
            f"`path` must be the Enron1 tarball {TARBALL} or a folder holding it. Got {str(path)!r}, which does not "
            "exist."
        )
    return path


def read_enron(path: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """The e-mails of Enron1 as texts, labels ``(n,)`` (1 = spam) and file names, in file-name order.

    ``path`` is ``enron1.tar.gz`` or a folder holding it. Files that are not valid UTF-8 (15 of 5,172) are
    decoded as Latin-1.
    """
    tarball = _tarball(path)
    try:
        archive = tarfile.open(tarball, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise InputError(
            f"{str(tarball)!r} is not a readable tar archive ({exc}); expected the Enron1 {TARBALL}."
        ) from None
    emails: dict[str, tuple[str, int]] = {}
    with archive:
        for member in archive:
            parts = member.name.split("/")
            if (
                not member.isfile()
                or len(parts) < 2
                or parts[-2] not in ("ham", "spam")
                or not parts[-1].endswith(".txt")
            ):
                continue
            raw = archive.extractfile(member).read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            emails[member.name] = (text, int(parts[-2] == "spam"))
    if not emails or len({label for _, label in emails.values()}) < 2:
        raise InputError(
            f"{str(tarball)!r} does not look like Enron1: expected e-mails under ham/ and spam/ folders "
            f"(*.txt), found {len(emails)} e-mail(s)."
        )
    names = sorted(emails)
    return [emails[n][0] for n in names], np.array([emails[n][1] for n in names], dtype=np.int64), names


def load_enron(path: str | Path, *, min_df: int = 20, dtype: torch.dtype = torch.float64) -> EnronSpam:
    """Enron1 as word-presence features for logistic regression.

    Words are scikit-learn ``CountVectorizer`` tokens (runs of two or more word characters); a word becomes a
    feature when it occurs in at least ``min_df`` e-mails (20: 2,957 words; 50: 1,376; 5: 8,498). The
    vocabulary is chosen from all e-mails without looking at labels. A feature is 1 when the word occurs
    in the e-mail (counts reach 701 and would dominate the L2 term; presence keeps every feature in [0, 1]).

    Args:
        path: ``enron1.tar.gz`` or a folder holding it.
        min_df: the least number of e-mails a word must occur in.
        dtype: the floating dtype of ``X``.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    min_df = check_int("min_df", min_df, low=1)
    texts, labels, names = read_enron(path)
    vectorizer = CountVectorizer(min_df=min_df, binary=True, dtype=np.float64)
    try:
        counts = vectorizer.fit_transform(texts)
    except ValueError as exc:  # no word occurs often enough
        raise InputError(
            f"`min_df`={min_df} leaves no word in the vocabulary of {len(texts)} e-mails; lower it ({exc})."
        ) from None
    X = torch.as_tensor(counts.toarray(), dtype=dtype)
    return EnronSpam(X, torch.as_tensor(labels), list(vectorizer.get_feature_names_out()), names, min_df)
