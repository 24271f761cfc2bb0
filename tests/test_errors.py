"""One-line errors: any message (multi-line, huge, empty, odd whitespace) becomes one bounded
line without raising, DiffGraph's own errors are one line at construction, and a pass that
fails with an empty message does not end `gca watch`."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, strategies as st
from rich.console import Console

from diffgraph.agents import gca
from diffgraph.errors import DiffGraphError, describe, one_line, reason
from diffgraph.merger.merge import MergeError
from diffgraph.tools.sources import IntegrityError, SourceError

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=2000)


def _is_one_line(text: str) -> bool:
    return text == " ".join(text.split())  # no newline, tab, vertical tab, \u2028 ...: single spaces only


@given(texts, st.integers(min_value=2, max_value=500))
def test_one_line_is_one_bounded_line(text, limit):
    out = one_line(text, limit)
    assert _is_one_line(out) and len(out) <= limit
    if len(" ".join(text.split())) <= limit:
        assert out == " ".join(text.split())
    else:
        assert out.endswith("…")


@given(texts, st.sampled_from([RuntimeError, ValueError, KeyError, OSError, MergeError, SourceError]))
def test_describe_and_reason_never_raise_and_never_come_back_empty(text, kind):
    exc = kind(text)
    for out in (describe(exc), reason(exc)):
        assert out and _is_one_line(out)
    assert describe(exc).startswith(kind.__name__)


@pytest.mark.parametrize("exc", [RuntimeError(), ValueError(""), OSError(), KeyError(), Exception("\n \n")])
def test_an_empty_message_is_named_by_its_type(exc):
    assert reason(exc) == describe(exc) == type(exc).__name__


def test_a_key_error_reads_as_its_message_not_its_repr():
    assert reason(KeyError("no base named 'x'")) == "no base named 'x'"
    assert describe(KeyError("gone")) == "KeyError: gone"


@given(texts)
def test_diffgraph_errors_are_one_line_and_never_empty_at_construction(text):
    for kind in (DiffGraphError, MergeError, IntegrityError):
        message = str(kind(text))
        assert message and _is_one_line(message)
    assert isinstance(IntegrityError(text), (DiffGraphError, SourceError))


def test_an_empty_message_does_not_end_gca_watch(monkeypatch, tmp_path):
    """The exception handler of the watch loop must itself survive any exception: an empty
    message used to raise IndexError there, ending the loop it protects."""
    calls = []

    def run_pass(specs, settings=None, console=None):
        calls.append(specs)
        if len(calls) == 1:
            raise RuntimeError()  # str() == ""
        if len(calls) == 2:
            raise OSError("disk\nfull\n")
        return {"run_id": "third", "counts": {"active": 1}}

    monkeypatch.setattr(gca, "run_pass", run_pass)
    out = io.StringIO()
    gca.watch(["local:/nowhere"], interval_s=0, passes=3, console=Console(file=out, width=200))
    assert len(calls) == 3
    lines = out.getvalue().splitlines()
    assert lines == ["pass failed: RuntimeError", "pass failed: OSError: disk full", "pass third: {'active': 1}"]
