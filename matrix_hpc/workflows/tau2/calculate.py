"""tau2's ``calculate`` tool without ``eval``.

tau2 accepts an expression made only of digits, ``+-*/().`` and spaces and
evaluates it with Python's ``eval``; so ``**`` (power) and ``//`` (floor
division) are accepted, and every error text is Python's own. Here the
expression is parsed by Python's compiler (same syntax errors) and the tree
is evaluated with Python's operators (same results and same error texts),
but nothing else of Python is reachable. One deliberate difference: a power
whose result would be astronomically large is refused instead of hanging
the process, which is where tau2's ``eval`` would stop responding.

Example::

    calculate("(1 + 2) * 3 / 4")   # '2.25'
    calculate("2 ** 10")           # '1024.0'
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

ALLOWED_CHARACTERS = "0123456789+-*/(). "
_MAX_POWER_BITS = 1 << 16  # past this, tau2's eval would compute for ages

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if abs(base).bit_length() * exponent > _MAX_POWER_BITS:
            raise ValueError("Result too large")
    return operator.pow(base, exponent)


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Call):
        # "2(3)" parses as a call of the number 2, which Python refuses so:
        func = _evaluate(node.func)
        for argument in node.args:
            _evaluate(argument)
        raise TypeError(f"'{type(func).__name__}' object is not callable")
    raise ValueError("Invalid expression")


def calculate(expression: str) -> str:
    """The result rounded to 2 decimals, as a string (tau2's ``calculate``)."""
    if not all(char in ALLOWED_CHARACTERS for char in expression):
        raise ValueError("Invalid characters in expression")
    if not isinstance(expression, str):  # e.g. a list of characters passes the check above
        raise TypeError("eval() arg 1 must be a string, bytes or code object")
    # eval() skips leading spaces and tabs of a source string; compile() does not.
    tree = compile(expression.lstrip(" \t"), "<string>", "eval", ast.PyCF_ONLY_AST)
    return str(round(float(_evaluate(tree)), 2))
