"""How an engine spells the few SQL expressions its dialect writes its own way.

The plan (``inputs``, ``parts``, ``outputs``) writes every statement once, in the SQL
both engines read, and asks its ``Dialect`` for the rest: identifier quoting, list
functions, ordered aggregation, banker's rounding. The one-line spellings stand side by
side in ``SPELLINGS``, one row an expression, so the two dialects read line by line
against each other; each engine module defines the two expressions that take more
than a line (``latest``, ``sorted_pair``) beside itself. Nothing rewrites one
dialect's text into another's.
"""

from __future__ import annotations

import abc

# expression -> (DuckDB, Spark SQL): a template over the method's argument names
SPELLINGS: dict[str, tuple[str, str]] = {
    "epoch_seconds": ("floor(epoch({column}))", "floor(unix_timestamp({column}))"),
    "round_even": ("round_even({value}, 0)", "bround({value}, 0)"),
    "head": ("{items}[1:{length}]", "slice({items}, 1, {length})"),
    "or_empty": ("coalesce({items}, [])", "coalesce({items}, array())"),
    "reverse": ("list_reverse({items})", "reverse({items})"),
    "blank": (
        "list_transform({items}, lambda x: CASE WHEN x = {item} THEN NULL ELSE x END)",
        "transform({items}, x -> CASE WHEN x = {item} THEN NULL ELSE x END)",
    ),
    "window_list": ("list({item}) OVER ({window})", "collect_list({item}) OVER ({window})"),
    "distinct_sorted": (
        "list_sort(coalesce(list(DISTINCT {item}) FILTER (WHERE {where}), []))",
        "array_sort(collect_set(CASE WHEN {where} THEN {item} END))",
    ),
}
DIALECTS = ("duckdb", "spark")  # the columns of SPELLINGS


class Dialect(abc.ABC):
    """The expressions an engine spells its own way. Arguments are SQL expressions;
    a list is an SQL array of item ids.

    Attributes:
        name: the engine whose column of ``SPELLINGS`` it reads (one of ``DIALECTS``).
        quote_char: the identifier quote (doubled inside a name).
    """

    name: str
    quote_char: str

    def quote(self, name: str) -> str:
        """``name`` as an identifier, whatever characters it holds."""
        q = self.quote_char
        return q + name.replace(q, q + q) + q

    def spell(self, expression: str, **arguments: object) -> str:
        """``expression``'s template in this dialect, filled with ``arguments``."""
        return SPELLINGS[expression][DIALECTS.index(self.name)].format(**arguments)

    def epoch_seconds(self, column: str) -> str:
        """A timestamp or date column as seconds since the epoch, rounded down."""
        return self.spell("epoch_seconds", column=column)

    def round_even(self, value: str) -> str:
        """``value`` rounded to an integer, halves to even (as numpy rounds)."""
        return self.spell("round_even", value=value)

    def head(self, items: str, length: int) -> str:
        """The first ``length`` entries of a list."""
        return self.spell("head", items=items, length=length)

    def or_empty(self, items: str) -> str:
        """A list, or the empty list where it is null."""
        return self.spell("or_empty", items=items)

    def reverse(self, items: str) -> str:
        """A list in reverse order."""
        return self.spell("reverse", items=items)

    def blank(self, items: str, item: str) -> str:
        """A list with every entry equal to ``item`` null."""
        return self.spell("blank", items=items, item=item)

    def window_list(self, item: str, window: str) -> str:
        """The list of ``item`` over the window ``window`` (``PARTITION BY ...``)."""
        return self.spell("window_list", item=item, window=window)

    def distinct_sorted(self, item: str, where: str) -> str:
        """An aggregate: the group's distinct ``item`` values where ``where`` holds,
        in ascending order; empty where no row does."""
        return self.spell("distinct_sorted", item=item, where=where)

    @abc.abstractmethod
    def latest(self, item: str, keys: list[str], where: str | None) -> str:
        """An aggregate: the group's ``item`` values, largest ``keys`` first (the most
        recent first), over the rows where ``where`` holds (all with None); null
        where no row does."""

    @abc.abstractmethod
    def sorted_pair(self, value: str, table: str, k: int) -> str:
        """A query of the k-th and (k+1)-th smallest ``value`` of ``table`` (0-based;
        the second absent past the end), in ascending order."""
