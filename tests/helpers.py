"""Shared test helpers (import as `from tests.helpers import assert_close`)."""
import torch


def assert_close(actual, expected, rtol, atol, what=""):
    """torch.testing.assert_close with the first mismatching elements printed on failure."""
    actual = actual.detach().cpu().to(expected.dtype)
    expected = expected.detach().cpu()
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=False)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        detail = ", ".join(f"{tuple(i)}: got {actual[tuple(i)].item():.6g} want {expected[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(f"{what} mismatch in {int(bad.sum())}/{bad.numel()} elements (rtol={rtol}, atol={atol}); first: {detail}")
