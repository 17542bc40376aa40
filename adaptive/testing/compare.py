"""Comparing two Traces: routing decisions exactly (first), then logits within a tolerance.

Every failure is an AssertionError that says what differed where: row, position and recursion step.
"""

from __future__ import annotations

import torch

from adaptive.testing.models import Trace

Tensor = torch.Tensor

ATOL = 1e-9
RTOL = 1e-7


def assert_same_routing(expected: Trace, actual: Trace, context: str, valid_BT: Tensor | None = None) -> None:
    """The discrete decisions (selected at each step, depth) must be identical at every valid position."""
    valid_BT = torch.ones_like(expected.depth_BT, dtype=torch.bool) if valid_BT is None else valid_BT
    differ_RBT = (expected.selected_RBT != actual.selected_RBT) & valid_BT
    if differ_RBT.any():
        step, row, pos = _earliest(differ_RBT)
        want = "selected" if expected.selected_RBT[step, row, pos] else "not selected"
        got = "selected" if actual.selected_RBT[step, row, pos] else "not selected"
        raise AssertionError(f"{context}: routing mismatch at row {row}, position {pos}, step {step}: expected "
                             f"{want}, got {got} ({int(differ_RBT.sum())} decisions differ in all)")
    differ_BT = (expected.depth_BT != actual.depth_BT) & valid_BT
    if differ_BT.any():
        _, row, pos = _earliest(differ_BT[None])
        raise AssertionError(f"{context}: depth mismatch at row {row}, position {pos}: expected "
                             f"{int(expected.depth_BT[row, pos])}, got {int(actual.depth_BT[row, pos])}")


def assert_close_logits(expected: Trace, actual: Trace, context: str, valid_BT: Tensor | None = None,
                        atol: float = ATOL, rtol: float = RTOL) -> None:
    """Logits must agree within ``atol + rtol * |expected|`` at every valid position."""
    error_BTV = (expected.logits_BTV - actual.logits_BTV).abs()
    bad_BT = (error_BTV > atol + rtol * expected.logits_BTV.abs()).any(-1) | actual.logits_BTV.isnan().any(-1)
    if valid_BT is not None:
        bad_BT = bad_BT & valid_BT
    if bad_BT.any():
        _, row, pos = _earliest(bad_BT[None])
        raise AssertionError(f"{context}: logits differ at row {row}, position {pos} by up to "
                             f"{float(error_BTV[row, pos].max()):.3e} (tolerance {atol:g} + {rtol:g}·|logit|; "
                             f"{int(bad_BT.sum())} positions differ in all)")


def assert_same(expected: Trace, actual: Trace, context: str, valid_BT: Tensor | None = None,
                atol: float = ATOL, rtol: float = RTOL) -> None:
    """Routing first (so a flipped decision is reported as such), then logits."""
    assert_same_routing(expected, actual, context, valid_BT)
    assert_close_logits(expected, actual, context, valid_BT, atol, rtol)


def _earliest(mask_XBT: Tensor) -> tuple[int, int, int]:
    """(x, b, t) of the True entry with the smallest position t (then row, then x)."""
    x, b, t = mask_XBT.nonzero().unbind(1)
    order = torch.argmin(t * (mask_XBT.shape[0] * mask_XBT.shape[1]) + b * mask_XBT.shape[0] + x)
    return int(x[order]), int(b[order]), int(t[order])
