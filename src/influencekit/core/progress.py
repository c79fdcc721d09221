"""Progress bars for long calls: tqdm when asked for, a silent stand-in otherwise."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(*, total: int | None, desc: str, enabled: bool) -> Any:
    """A tqdm bar when ``enabled``, else an object with the same ``update``/``close`` that does nothing."""
    if not enabled:
        return _Silent()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
