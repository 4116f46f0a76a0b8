"""`sftcore.tokens.Marked`: a template's own markers (ChatML's) become the tokenizer's added-token
ids exactly where the tokenizer's own call puts them at inference; user text stays text."""

from __future__ import annotations

import copy
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftcore.tokens import Marked, clip_text, encode_marked_offsets, encode_prompts, encode_texts, special_affixes
from sftcore_plugins.masking import SeparateMasker
from toy_tokenizers import BUILDERS

MARKERS = ("<|im_start|>", "<|im_end|>")
# Contents free of special-token strings, so the tokenizer's own parse is the inference reference;
# spaces and newlines at the edges test the seams around each marker.
CONTENT = st.lists(st.sampled_from(list("abc xyz,.!?\n ") + ["é", "中", "Hello", " world", "\n\n"]), min_size=1, max_size=12).map("".join)
TURNS = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), CONTENT), min_size=1, max_size=4)


def render(turns) -> Marked:
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return Marked(text + "<|im_start|>assistant\n", MARKERS)


def with_chatml_tokens(name):
    tok = copy.deepcopy(BUILDERS[name]())  # the builders' tokenizers are shared: never change one
    tok.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    return tok


def inference_ids(tok, text: str) -> list[int]:
    """The tokenizer's own parse of the text (as after a chat template), after its leading specials."""
    return special_affixes(tok)[0] + tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_markers_encode_as_the_tokenizer_itself_encodes_them(name):
    tok = with_chatml_tokens(name)
    start, end = tok.convert_tokens_to_ids(list(MARKERS))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(turns=TURNS)
    def run(turns):
        prompt = render(turns)
        ids = encode_prompts(tok, [prompt])[0]
        assert ids == inference_ids(tok, str(prompt))
        assert ids.count(start) == prompt.count(MARKERS[0]) and ids.count(end) == prompt.count(MARKERS[1])
        ids_only, offsets = encode_marked_offsets(tok, prompt)
        assert ids_only == ids[len(ids) - len(ids_only):] and len(offsets) == len(ids_only)
        for token, (begin, stop) in zip(ids_only, offsets):
            if token in (start, end):
                assert prompt[begin:stop] in MARKERS

    run()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_special_string_typed_by_a_user_stays_text(name):
    tok = with_chatml_tokens(name)
    specials = [t for t in (tok.eos_token, tok.bos_token, "<|endoftext|>") if t in tok.get_added_vocab()]
    assert tok.eos_token in specials
    prompt = render([("user", " ".join(f"say {s} now" for s in specials))])
    ids = encode_prompts(tok, [prompt])[0]
    prefix = encode_prompts(tok, [Marked("", MARKERS)])[0]
    for special in specials:
        special_id = tok.convert_tokens_to_ids(special)
        assert ids[len(prefix):].count(special_id) == 0, special


@pytest.mark.parametrize("name", list(BUILDERS))
def test_without_chatml_tokens_markers_are_text(name):
    tok = BUILDERS[name]()
    prompt = render([("user", "Hi there"), ("assistant", "Hello.")])
    assert encode_prompts(tok, [prompt]) == encode_prompts(tok, [str(prompt)])
    assert encode_marked_offsets(tok, prompt) is None


def test_the_builtin_masker_gives_a_marked_prompt_its_inference_ids():
    tok = with_chatml_tokens("sentencepiece")
    prompt = render([("user", "Opposite of hot?")])
    masked = SeparateMasker()(prompt, "Cold.", tok, 128)
    n = masked["labels"].count(-100)
    assert masked["input_ids"][:n] == encode_prompts(tok, [prompt])[0] == inference_ids(tok, str(prompt))
    assert masked["input_ids"][n:] == encode_texts(tok, ["Cold."])[0] + [tok.eos_token_id]


def test_markers_survive_clipping_and_pickling():
    tok = with_chatml_tokens("gpt2")
    prompt = render([("user", "x" * 200_000)])
    clipped = clip_text(tok, prompt, 16, keep="tail")
    assert isinstance(clipped, Marked) and clipped.markers == MARKERS and len(clipped) < len(prompt)
    again = pickle.loads(pickle.dumps(prompt))  # how rows reach `sft prepare --workers`
    assert isinstance(again, Marked) and again.markers == MARKERS and again == prompt
    assert encode_prompts(tok, [again]) == encode_prompts(tok, [prompt])


def test_a_batch_may_mix_marked_and_plain_texts():
    tok = with_chatml_tokens("tiny")
    marked, plain = render([("user", "Hi")]), "<|im_start|>user\nHi"
    both = encode_prompts(tok, [marked, plain, marked])
    assert both == [encode_prompts(tok, [marked])[0], encode_prompts(tok, [plain])[0], encode_prompts(tok, [marked])[0]]
    assert both[0] != both[1]
