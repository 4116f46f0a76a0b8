"""sftcore.testing: the fixtures reach tests through the pytest11 entry point, and
check_mask_invariants passes the built-in stages and catches each way a masker can be wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from sftcore import IGNORE_INDEX, RowDropped, hookimpl
from sftcore.assets import DEMO_DATA
from sftcore.errors import PluginError
from sftcore.testing import check_mask_invariants, make_host

ROWS = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()[:12]]
ROWS.append({"instruction": "Name a colour.", "input": "Answer in one word.", "output": "Blue"})


class EchoTemplates:
    @hookimpl
    def register_templates(self, register):
        register("echo", lambda: None, description="a throwaway template")


class Broken:
    @hookimpl
    def register_templates(self, register):
        raise RuntimeError("boom")


def test_importing_the_kit_imports_neither_torch_nor_transformers():
    code = "import sys, sftcore.testing; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sft_host_has_the_builtins_and_the_plugin_and_nothing_installed(sft_host):
    host = sft_host(EchoTemplates())
    component = host.registry.get("template", "echo")
    assert (component.plugin, component.distribution) == ("EchoTemplates", "(local)")
    assert "alpaca" in host.registry.names("template")
    assert {p.name for p in host.plugins if not p.builtin} == {"EchoTemplates"}


def test_sft_host_without_builtins_and_with_a_chosen_name(sft_host):
    host = sft_host(builtins=False, echo_plugin=EchoTemplates())
    assert host.registry.names("template") == ["echo"]
    assert host.registry.names("masker") == []
    assert host.registry.get("template", "echo").plugin == "echo_plugin"


def test_make_host_is_strict_about_a_broken_plugin():
    with pytest.raises(PluginError, match="Broken.*RuntimeError: boom"):
        make_host(Broken())


def test_make_host_refuses_two_plugins_of_one_name():
    with pytest.raises(ValueError, match="two plugins named 'EchoTemplates'"):
        make_host(EchoTemplates(), EchoTemplates())


@pytest.fixture
def shell_disables_alpaca(monkeypatch):
    monkeypatch.setenv("SFT_DISABLE_PLUGINS", "alpaca")


def test_sft_host_ignores_the_shells_disabled_plugins(shell_disables_alpaca, sft_host):
    assert "alpaca" in sft_host().registry.names("template")


def test_tiny_tokenizer_is_the_shipped_one(tiny_tokenizer):
    assert (tiny_tokenizer.bos_token, tiny_tokenizer.eos_token) == ("<s>", "</s>")


def test_tiny_model_dir_is_a_loadable_checkpoint(tiny_model_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tiny_model_dir.iterdir()}


# --- check_mask_invariants on the built-in stages -------------------------------------------


@pytest.fixture
def stages(sft_host):
    host = sft_host()
    return host.registry, host.registry.build("template", "alpaca")


@pytest.mark.parametrize("truncation", ["prompt-left", "right", "drop"])
@pytest.mark.parametrize("max_length", [512, 56])
def test_builtin_response_only_masker_passes(stages, tiny_tokenizer, truncation, max_length):
    registry, template = stages
    masker = registry.build("masker", "response-only", {"truncation": truncation})
    check_mask_invariants(template, masker, tiny_tokenizer, ROWS, max_length=max_length)


@pytest.mark.parametrize(("truncation", "cut"), [("prompt-left", "prompt"), ("right", "response")])
def test_the_short_max_length_cuts_some_rows_and_keeps_others(stages, tiny_tokenizer, truncation, cut):
    registry, template = stages
    masker = registry.build("masker", "response-only", {"truncation": truncation})
    prompts, responses = zip(*(template.format(row) for row in ROWS))
    results = masker.batch(prompts, responses, tiny_tokenizer, 56)
    assert {None, cut} <= {r.get("truncated") for r in results if isinstance(r, dict)}


def test_builtin_full_masker_passes_when_prompt_supervision_is_expected(stages, tiny_tokenizer):
    registry, template = stages
    check_mask_invariants(template, registry.build("masker", "full"), tiny_tokenizer, ROWS, supervise_prompt=True)


# --- check_mask_invariants catches broken stages --------------------------------------------


class Mutated:
    """The built-in masker with its output changed by ``change(result, prompt, response, tokenizer)``."""

    def __init__(self, base, change: Callable[..., dict]):
        self.base, self.change = base, change

    def __call__(self, prompt, response, tokenizer, max_length):
        return self.change(dict(self.base(prompt, response, tokenizer, max_length)), prompt, response, tokenizer)


def _without_eos(r, *_):
    return {"input_ids": r["input_ids"][:-1], "labels": r["labels"][:-1]}


def _prompt_supervised(r, *_):
    return {"input_ids": r["input_ids"], "labels": list(r["input_ids"])}


def _no_bos(r, *_):
    return {"input_ids": r["input_ids"][1:], "labels": r["labels"][1:]}


def _prompt_joined_with_response(r, prompt, response, tok):
    # Whole-text tokenization without the trailing newline: training ids that inference never sees.
    ids = tok(prompt.rstrip("\n") + " " + response, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - 3) + ids[-3:]}


def _labels_shifted(r, *_):
    labels = r["labels"]
    return {"input_ids": r["input_ids"], "labels": labels[1:] + [IGNORE_INDEX]}


def _all_masked(r, *_):
    return {"input_ids": r["input_ids"], "labels": [IGNORE_INDEX] * len(r["labels"])}


def _one_label_short(r, *_):
    return {"input_ids": r["input_ids"], "labels": r["labels"][:-1]}


def _first_response_token_masked(r, *_):
    labels = list(r["labels"])
    labels[labels.index(next(label for label in labels if label != IGNORE_INDEX))] = IGNORE_INDEX
    return {"input_ids": r["input_ids"], "labels": labels}


def _padded_past_max_length(r, *_):
    return {"input_ids": r["input_ids"] + [2] * 600, "labels": r["labels"] + [IGNORE_INDEX] * 600}


def _bad_truncated_value(r, *_):
    return {**r, "truncated": "yes"}


BROKEN = {
    "drops EOS": (_without_eos, "does not end with a supervised EOS"),
    "supervises the prompt": (_prompt_supervised, r"prompt token\(s\) supervised, first at position 0 \(\['<s>'\]\)"),
    "prompt without BOS": (_no_bos, "do not start with the inference prompt's ids: position 0"),
    "prompt ids unlike inference": (_prompt_joined_with_response, "do not start with the inference prompt's ids"),
    "labels shifted": (_labels_shifted, r"label\(s\) differ from the input id there"),
    "all masked": (_all_masked, "every label is -100"),
    "lengths differ": (_one_label_short, "input_ids but .* labels"),
    "response token masked": (_first_response_token_masked, r"after the prompt are not supervised"),
    "too long": (_padded_past_max_length, "exceed max_length 512"),
    "unknown truncated value": (_bad_truncated_value, "truncated is 'yes'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_catches_a_broken_masker(stages, tiny_tokenizer, case):
    registry, template = stages
    change, message = BROKEN[case]
    masker = Mutated(registry.build("masker", "response-only"), change)
    with pytest.raises(AssertionError, match=message):
        check_mask_invariants(template, masker, tiny_tokenizer, ROWS)


def test_names_the_row_and_lists_every_broken_rule(stages, tiny_tokenizer):
    registry, template = stages
    masker = Mutated(registry.build("masker", "response-only"), lambda r, *_: _without_eos(_prompt_supervised(r)))
    with pytest.raises(AssertionError) as info:
        check_mask_invariants(template, masker, tiny_tokenizer, ROWS[:1])
    lines = str(info.value).splitlines()
    assert lines[0] == "2 mask invariant(s) broken in 1 rows:"
    assert lines[1].startswith("- row 0: ") and "prompt token(s) supervised" in lines[1]
    assert lines[2].startswith("- row 0: ") and "supervised EOS" in lines[2]


def test_catches_a_cut_response_that_keeps_eos(stages, tiny_tokenizer):
    registry, template = stages
    masker = Mutated(registry.build("masker", "response-only"), lambda r, *_: {**r, "truncated": "response"})
    with pytest.raises(AssertionError, match="the response was cut but the row still ends with EOS"):
        check_mask_invariants(template, masker, tiny_tokenizer, ROWS[:3])


def test_catches_a_batch_that_disagrees_with_single_calls(stages, tiny_tokenizer):
    registry, template = stages
    base = registry.build("masker", "response-only")

    class Batched(Mutated):
        def batch(self, prompts, responses, tokenizer, max_length):
            return [RowDropped("too-long")] + base.batch(prompts[1:], responses[1:], tokenizer, max_length)

    with pytest.raises(AssertionError, match=r"row 0: masker.batch gives \('RowDropped', 'too-long'\)"):
        check_mask_invariants(template, Batched(base, lambda r, *_: r), tiny_tokenizer, ROWS[:3])


def test_catches_a_template_whose_training_prompt_drifts(stages, tiny_tokenizer):
    registry, template = stages

    class Drifting:
        def format(self, row):
            prompt, response = template.format(row)
            return prompt.rstrip("\n"), response

        def format_prompt(self, row):
            return template.format_prompt(row)

    with pytest.raises(AssertionError, match=r"format\(row\)\[0\] differs from format_prompt\(row\) at character"):
        check_mask_invariants(Drifting(), registry.build("masker", "response-only"), tiny_tokenizer, ROWS[:2])


def test_a_template_error_is_reported_per_row(stages, tiny_tokenizer):
    registry, template = stages
    rows = [ROWS[0], {"instruction": "", "output": "x"}]
    with pytest.raises(AssertionError, match="row 1: the template raised FieldError: field 'instruction': is empty"):
        check_mask_invariants(template, registry.build("masker", "response-only"), tiny_tokenizer, rows)


def test_dropped_rows_pass_but_all_dropped_fails(stages, tiny_tokenizer):
    registry, template = stages
    masker = registry.build("masker", "response-only", {"truncation": "drop"})
    short = {"instruction": "Hi.", "output": "Hello."}
    check_mask_invariants(template, masker, tiny_tokenizer, [short, ROWS[0]], max_length=40)
    with pytest.raises(AssertionError, match=r"dropped \(allowed\): too-long \(rows 0\).*\n- every row was dropped"):
        check_mask_invariants(template, masker, tiny_tokenizer, [ROWS[0]], max_length=40)
    with pytest.raises(AssertionError, match="no rows were given"):
        check_mask_invariants(template, masker, tiny_tokenizer, [])
