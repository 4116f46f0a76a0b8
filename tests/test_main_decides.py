"""In a run of several processes the main one alone looks at the output directory: the others
take its checkpoint, or its refusal, and never wait for a value that is not coming."""

from __future__ import annotations

import pytest

from sftcore.run import distributed
from sftcore.errors import SftError, UsageError


@pytest.fixture(autouse=True)
def group(monkeypatch):
    """A process group of several, as far as `decided` asks."""
    monkeypatch.setattr(distributed, "_group", lambda: object())


def test_the_others_take_the_main_process_decision_without_deciding(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "agreed", lambda value: ("out/checkpoint-4", None))
    assert distributed.decided(lambda: pytest.fail("only the main process decides")) == "out/checkpoint-4"


def test_the_others_raise_the_main_process_refusal_silently(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "agreed", lambda value: (None, ("output out holds another run", 2)))
    with pytest.raises(SftError) as caught:
        distributed.decided(lambda: pytest.fail("only the main process decides"))
    assert (str(caught.value), caught.value.exit_code) == ("output out holds another run", 2)
    assert caught.value.same_in_every_process, "the main process prints it"


def test_the_main_process_sends_its_refusal_then_raises_it(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    sent = []
    monkeypatch.setattr(distributed, "agreed", lambda value: sent.append(value) or value)

    def refuse():
        raise UsageError("output out holds another run\n(details)")

    with pytest.raises(UsageError):
        distributed.decided(refuse)
    assert distributed.decided(lambda: "out/checkpoint-2") == "out/checkpoint-2"
    assert sent == [(None, ("output out holds another run", 2)), ("out/checkpoint-2", None)]


def test_a_process_alone_decides_for_itself(monkeypatch):
    monkeypatch.setattr(distributed, "_group", lambda: None)
    monkeypatch.setattr(distributed, "agreed", lambda value: pytest.fail("nobody to agree with"))
    assert distributed.decided(lambda: "out") == "out"
