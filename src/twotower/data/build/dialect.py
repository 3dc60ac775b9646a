"""How an engine spells the few SQL expressions its dialect writes its own way.

The plan (``inputs``, ``parts``, ``outputs``) writes every statement once, in the SQL
both engines read, and asks its ``Dialect`` for the rest: identifier quoting, list
functions, ordered aggregation, banker's rounding. Each engine module defines its
dialect beside itself; nothing rewrites one dialect's text into another's.
"""

from __future__ import annotations

import abc


class Dialect(abc.ABC):
    """The expressions an engine spells its own way. Arguments are SQL expressions;
    a list is an SQL array of item ids.

    Attributes:
        quote_char: the identifier quote (doubled inside a name).
    """

    quote_char: str = '"'

    def quote(self, name: str) -> str:
        """``name`` as an identifier, whatever characters it holds."""
        q = self.quote_char
        return q + name.replace(q, q + q) + q

    @abc.abstractmethod
    def epoch_seconds(self, column: str) -> str:
        """A timestamp or date column as seconds since the epoch, rounded down."""

    @abc.abstractmethod
    def round_even(self, value: str) -> str:
        """``value`` rounded to an integer, halves to even (as numpy rounds)."""

    @abc.abstractmethod
    def head(self, items: str, length: int) -> str:
        """The first ``length`` entries of a list."""

    @abc.abstractmethod
    def or_empty(self, items: str) -> str:
        """A list, or the empty list where it is null."""

    @abc.abstractmethod
    def reverse(self, items: str) -> str:
        """A list in reverse order."""

    @abc.abstractmethod
    def blank(self, items: str, item: str) -> str:
        """A list with every entry equal to ``item`` null."""

    @abc.abstractmethod
    def window_list(self, item: str, window: str) -> str:
        """The list of ``item`` over the window ``window`` (``PARTITION BY ...``)."""

    @abc.abstractmethod
    def latest(self, item: str, keys: list[str], where: str | None) -> str:
        """An aggregate: the group's ``item`` values, largest ``keys`` first (the most
        recent first), over the rows where ``where`` holds (all with None); null
        where no row does."""

    @abc.abstractmethod
    def distinct_sorted(self, item: str, where: str) -> str:
        """An aggregate: the group's distinct ``item`` values where ``where`` holds,
        in ascending order; empty where no row does."""

    @abc.abstractmethod
    def sorted_pair(self, value: str, table: str, k: int) -> str:
        """A query of the k-th and (k+1)-th smallest ``value`` of ``table`` (0-based;
        the second absent past the end), in ascending order."""
