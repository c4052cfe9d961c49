"""GBNF expressions for JSON numbers between bounds, digit by digit.

llama-cpp-python's schema converter writes an integer as up to 16 digits and passes over
`minimum`/`maximum`; these expressions are what it writes instead when a schema bounds a number
(grammar.py hooks them in). The integers of [30, 420] are
`[3-9] [0-9] | ([1-3] [0-9]{2} | "4" ([0-1] [0-9] | "2" "0"))`: per length of number, a first
digit that leaves the rest free, or one that is fixed and narrows the next. The idea is
llama.cpp's own (its C++ converter's `_generate_min_max_int`), written afresh. Numbers are
written without an exponent, their fraction with at most 16 digits, the last one not zero.
"""

from __future__ import annotations

# Open sides stop where the converter's own integers stop: 16 digits.
DIGITS = 16
# A double tells apart any two numbers of 15 significant digits.
_DOUBLE_DIGITS = 15


def integer_range(low: int | None, high: int | None) -> str:
    """The JSON integers from `low` to `high`, both included; None: as far as 16 digits go."""
    limit = _limit(low, high)
    low, high = -limit if low is None else low, limit if high is None else high
    if low > high:
        raise ValueError(f"no integer lies between {low} and {high}")
    alternatives = []
    if low < 0:  # "-0" is left out: 0 is written "0"
        alternatives.append(f'"-" ({_naturals(max(-high, 1), -low)})')
    if high >= 0:
        alternatives.append(_naturals(max(low, 0), high))
    return " | ".join(alternatives)


def number_range(
    low: int | None, high: int | None, *, low_excluded: bool, high_excluded: bool
) -> str:
    """The JSON numbers from `low` to `high` (whole numbers; None: open), each end included or
    excluded: the whole numbers of the range, and the numbers with a fraction strictly inside it.
    """
    limit = _limit(low, high)
    bottom, top = -limit if low is None else low, limit if high is None else high
    if bottom > top or (bottom == top and (low_excluded or high_excluded)):
        raise ValueError(f"no number lies between {low} and {high}")
    alternatives = []
    first, last = bottom + low_excluded, top - high_excluded
    if first <= last:
        alternatives.append(integer_range(first, last))
    # A fraction more than zero, never "0.50" nor "0.0"; near an excluded bound (but 0: a double
    # holds tiny numbers), short enough not to parse to the bound: 9.99999999999999999 is 10.0.
    excluded = [abs(b) for b, out in ((low, low_excluded), (high, high_excluded)) if out and b]
    digits = _DOUBLE_DIGITS - len(str(max(excluded))) if excluded else DIGITS
    if digits < 1:
        return " | ".join(alternatives)
    fraction = f'"." [0-9]{{0,{digits - 1}}} [1-9]'
    # With a fraction, x lies strictly between its whole part and the next: up to top - 1.
    above = limit if high is None else top - 1
    if above >= max(bottom, 0):
        alternatives.append(f"({_naturals(max(bottom, 0), above)}) {fraction}")
    below = limit if low is None else -bottom - 1  # the same below 0, mirrored
    if below >= max(-top, 0):
        alternatives.append(f'"-" ({_naturals(max(-top, 0), below)}) {fraction}')
    return " | ".join(alternatives)


def _limit(*bounds: int | None) -> int:
    """The largest value of an open side: 16 digits, or as many as a bound has."""
    digits = max([DIGITS, *(len(str(abs(b))) for b in bounds if b is not None)])
    return 10**digits - 1


def _naturals(low: int, high: int) -> str:
    """The decimal forms of low..high (0 <= low <= high), without leading zeros."""
    if low == 0:
        return '"0"' + (f" | {_naturals(1, high)}" if high else "")
    low_digits, high_digits = len(str(low)), len(str(high))
    if low_digits == high_digits:
        return _same_length(str(low), str(high))
    # The lengths every number of which is in are written at once; the two ends as they fall.
    shortest, longest, alternatives = low_digits, high_digits, []
    if low > 10 ** (low_digits - 1):
        alternatives.append(_same_length(str(low), "9" * low_digits))
        shortest += 1
    if high < 10**high_digits - 1:
        longest -= 1
    if shortest <= longest:
        alternatives.append(f"[1-9]{_any_digits(shortest - 1, longest - 1)}")
    if longest < high_digits:
        alternatives.append(_same_length("1" + "0" * (high_digits - 1), str(high)))
    return " | ".join(alternatives)


def _any_digits(fewest: int, most: int) -> str:
    """From `fewest` to `most` digits, after a space (or nothing, for none)."""
    if most == 0:
        return ""
    if fewest == most:
        return " [0-9]" if most == 1 else f" [0-9]{{{most}}}"
    return f" [0-9]{{{fewest},{most}}}"


def _same_length(low: str, high: str) -> str:
    """The digit strings from `low` to `high`, which have the same length."""
    if low == high:
        return f'"{low}"'
    shared = next(i for i, (a, b) in enumerate(zip(low, high, strict=True)) if a != b)
    prefix = f'"{low[:shared]}" ' if shared else ""
    first, last = low[shared], high[shared]
    low_tail, high_tail = low[shared + 1 :], high[shared + 1 :]
    rest = len(low_tail)
    zeros, nines = "0" * rest, "9" * rest
    alternatives = []
    # Below `first` + low_tail nothing is allowed; from the next first digit on, any tail is.
    free_from = first if low_tail == zeros else chr(ord(first) + 1)
    free_to = last if high_tail == nines else chr(ord(last) - 1)
    if free_from != first:
        alternatives.append(f'"{first}" {_same_length(low_tail, nines)}')
    if free_from <= free_to:
        digit = f'"{free_from}"' if free_from == free_to else f"[{free_from}-{free_to}]"
        alternatives.append(digit + _any_digits(rest, rest))
    if free_to != last:
        alternatives.append(f'"{last}" {_same_length(zeros, high_tail)}')
    body = alternatives[0] if len(alternatives) == 1 else f"({' | '.join(alternatives)})"
    return prefix + body
