"""Property tests of the `response-only` and `full` maskers with the alpaca template, on every
tokenizer family: random unicode text, outputs starting with '-' or ':', literal special-token
strings inside the text, odd whitespace, and random ``max_length``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sftcore import IGNORE_INDEX, RowDropped
from sftcore.errors import FieldError
from sftcore.tokens import encode_prompts, special_affixes
from sftcore_plugins.alpaca import AlpacaTemplate
from sftcore_plugins.masking import SeparateMasker, full_masker

from toy_tokenizers import BUILDERS

SPECIAL_STRINGS = [
    "</s>",
    "<s>",
    "<unk>",
    "<pad>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
]
SEAM = ["-", ":", "- ", ": ", ":-", "-1", "\n", "\n\n", "  ", "\t", " ", "### Response:", "Response:"]

fragment = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
    st.text("abcdefghij klmnop.,!?'", min_size=1, max_size=20),
    st.sampled_from(["é", "中文", "😀", "e\u0301", "שלום", "ß", "\u00a0", "\u200b", "İ"]),
    st.sampled_from(SPECIAL_STRINGS),
    st.sampled_from(SEAM),
)
text = st.lists(fragment, max_size=8).map("".join)
# Template fields must not be blank; one visible character somewhere keeps most examples valid.
nonblank = st.tuples(text, st.text("abcxyz-:0<>/|", min_size=1, max_size=6), text).map("".join)
output = st.tuples(st.sampled_from(["", "-", ":", "- ", ": ", ":-", " -", "\n-"]), nonblank).map("".join)
rows = st.fixed_dictionaries(
    {"instruction": nonblank, "input": st.one_of(st.just(""), st.just("   "), text), "output": output}
)

TEMPLATE = AlpacaTemplate()
# Alpaca prompts are 40-90 tokens: spread budgets over "cuts everything", "cuts something" and "fits".
budgets = st.one_of(st.integers(2, 48), st.integers(48, 160), st.integers(160, 400))
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def format_or_reject(row: dict) -> tuple[str, str]:
    try:
        return TEMPLATE.format(row)
    except FieldError:
        assume(False)
        raise  # unreachable: assume(False) stops the example


def special_strings(tok) -> list[str]:
    return sorted(set(tok.all_special_tokens) | set(tok.get_added_vocab()) | set(SPECIAL_STRINGS))


def response_ids(tok, response: str) -> list[int]:
    return tok(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def check_response_only(tok, prompt: str, response: str, max_length: int, result) -> None:
    """Every invariant the response-only masker promises, checked against independent encodings."""
    eos = tok.eos_token_id
    prefix = special_affixes(tok)[0]
    suffix = special_affixes(tok)[1]  # non-empty only for a tokenizer that appends EOS itself
    p_ids = encode_prompts(tok, [prompt])[0]
    r_ids = response_ids(tok, response)
    plain = not any(s in prompt for s in special_strings(tok))
    if plain:
        # Training's prompt ids are the ids the model sees at inference.
        assert p_ids + suffix == tok(prompt)["input_ids"]
    assert p_ids[: len(prefix)] == prefix

    if isinstance(result, RowDropped):
        # prompt-left always leaves room for a response unless the budget is all leading specials.
        assert result.reason == "prompt-too-long"
        assert max_length <= len(prefix)
        return

    ids, labels = result["input_ids"], result["labels"]
    assert len(ids) == len(labels) <= max_length
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert supervised, "a row with every label -100 must be dropped, not returned"
    k = supervised[0]
    assert supervised == list(range(k, len(ids))), "supervised tokens must be one contiguous suffix"
    assert all(labels[i] == ids[i] for i in supervised)
    assert labels[:k] == [IGNORE_INDEX] * k
    prompt_part, response_part = ids[:k], ids[k:]
    assert prompt_part[: len(prefix)] == prefix, "leading specials (BOS) are never cut"

    # Whatever is cut, the prompt keeps its leading specials and its end (the response marker).
    tail = len(prompt_part) - len(prefix)
    assert prompt_part == prefix + (p_ids[len(p_ids) - tail :] if tail else [])
    truncated = result.get("truncated")
    if truncated is None:
        assert len(p_ids) + len(r_ids) + 1 <= max_length
        assert prompt_part == p_ids
        assert response_part == r_ids + [eos]
    elif truncated == "prompt":
        assert len(p_ids) + len(r_ids) + 1 > max_length
        assert len(prompt_part) < len(p_ids)
        assert response_part == r_ids + [eos]
        assert len(ids) == max_length, "the prompt is cut only as far as needed"
    else:
        assert truncated == "response"
        assert len(response_part) <= len(r_ids)
        assert response_part == r_ids[: len(response_part)]
        assert len(ids) == max_length
        # The prompt keeps at least half the budget when it is that long.
        assert len(prompt_part) >= min(len(p_ids), max_length // 2)

    if truncated == "response":
        assert eos not in response_part, "a response cut short must not teach the model to stop there"
    else:
        assert ids[-1] == eos
    # EOS never comes from the text: a literal '</s>' or '<|endoftext|>' stays text.
    assert ids.count(eos) == (0 if truncated == "response" else 1) + prefix.count(eos)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_response_only_and_full_invariants(name):
    tok = BUILDERS[name]()
    masker, full = SeparateMasker(), full_masker()

    @PROPERTY
    @given(row=rows, max_length=budgets)
    def run(row, max_length):
        prompt, response = format_or_reject(row)
        try:
            result = masker(prompt, response, tok, max_length)
        except RowDropped as dropped:
            result = dropped
        check_response_only(tok, prompt, response, max_length, result)
        try:
            whole = full(prompt, response, tok, max_length)
        except RowDropped as dropped:
            assert isinstance(result, RowDropped) and dropped.reason == result.reason
            return
        assert not isinstance(result, RowDropped)
        assert whole["input_ids"] == result["input_ids"]
        assert whole["labels"] == whole["input_ids"]
        assert whole.get("truncated") == result.get("truncated")

    run()


@pytest.mark.parametrize("name", ["gpt2", "sentencepiece", "llama3"])
def test_right_and_drop_policies(name):
    tok = BUILDERS[name]()
    right, drop = SeparateMasker(truncation="right"), SeparateMasker(truncation="drop")
    eos = tok.eos_token_id

    @PROPERTY
    @given(row=rows, max_length=st.integers(min_value=1, max_value=160))
    def run(row, max_length):
        prompt, response = format_or_reject(row)
        p_ids = encode_prompts(tok, [prompt])[0]
        whole = p_ids + response_ids(tok, response) + [eos]
        fits = len(whole) <= max_length

        try:
            got = right(prompt, response, tok, max_length)
        except RowDropped as dropped:
            assert dropped.reason == "prompt-too-long" and len(p_ids) >= max_length
        else:
            assert len(p_ids) < max_length
            assert got["input_ids"] == whole[:max_length]
            assert got["labels"] == [IGNORE_INDEX] * len(p_ids) + whole[len(p_ids) : max_length]
            assert got.get("truncated") == (None if fits else "response")

        try:
            got = drop(prompt, response, tok, max_length)
        except RowDropped as dropped:
            assert dropped.reason == "too-long" and not fits
        else:
            assert fits and got["input_ids"] == whole and "truncated" not in got

    run()


@pytest.mark.parametrize("name", ["sentencepiece", "llama3"])
def test_batch_equals_row_by_row(name):
    """The protocol lets the host call ``batch``; it must return exactly what single calls return."""
    tok = BUILDERS[name]()
    masker = SeparateMasker()

    @settings(max_examples=25, deadline=None)
    @given(batch=st.lists(rows, min_size=1, max_size=6), max_length=st.integers(min_value=1, max_value=120))
    def run(batch, max_length):
        pairs = []
        for row in batch:
            try:
                pairs.append(TEMPLATE.format(row))
            except FieldError:
                continue
        assume(pairs)
        together = masker.batch([p for p, _ in pairs], [r for _, r in pairs], tok, max_length)
        assert len(together) == len(pairs)
        for (prompt, response), got in zip(pairs, together):
            try:
                alone = masker(prompt, response, tok, max_length)
            except RowDropped as dropped:
                assert isinstance(got, RowDropped) and got.reason == dropped.reason
            else:
                assert got == alone

    run()
