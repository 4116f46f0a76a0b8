"""The `pad` collator: right padding, -100 labels on padding, attention mask from lengths."""

from __future__ import annotations

import pytest
import torch

from sftcore import IGNORE_INDEX
from sftcore_plugins.pad import PadCollator

ROWS = [
    {"input_ids": [5, 6, 7, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 2]},
    {"input_ids": [5, 9], "labels": [IGNORE_INDEX, 9]},
    {"input_ids": [5, 6, 8, 8, 2], "labels": [IGNORE_INDEX, 6, 8, 8, 2]},
]


def test_right_pads_ids_labels_and_mask():
    batch = PadCollator(pad_token_id=0)(ROWS)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 0], [5, 9, 0, 0, 0], [5, 6, 8, 8, 2]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 7, 2, IGNORE_INDEX],
        [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 6, 8, 8, 2],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_mask_comes_from_lengths_when_pad_equals_eos():
    """Pad id 2 is also the EOS that ends rows 0 and 2 (and a real token inside row 1)."""
    rows = ROWS + [{"input_ids": [2, 2, 2], "labels": [IGNORE_INDEX, 2, 2]}]
    batch = PadCollator(pad_token_id=2)(rows)
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 2, 5, 3]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]
    assert batch["input_ids"][0, 3].item() == 2 and batch["labels"][0, 3].item() == 2
    assert batch["input_ids"][1].tolist() == [5, 9, 2, 2, 2]
    assert batch["labels"][3].tolist() == [IGNORE_INDEX, 2, 2, IGNORE_INDEX, IGNORE_INDEX]


@pytest.mark.parametrize(("multiple", "width"), [(None, 5), (1, 5), (4, 8), (5, 5), (8, 8), (16, 16)])
def test_pad_to_multiple_of(multiple, width):
    batch = PadCollator(pad_token_id=0, pad_to_multiple_of=multiple)(ROWS)
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].shape == (3, width)
    assert batch["labels"][:, 5:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][:, 5:].eq(0).all()
    assert batch["input_ids"][:, 5:].eq(0).all()


@pytest.mark.parametrize("bad", [0, -8])
def test_pad_to_multiple_of_must_be_positive(bad):
    with pytest.raises(ValueError, match="positive"):
        PadCollator(pad_to_multiple_of=bad)


def test_inputs_are_not_modified_and_single_row_works():
    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3], "row": 4}]
    batch = PadCollator(pad_token_id=9, pad_to_multiple_of=4)(rows)
    assert rows == [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3], "row": 4}]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX]]


def test_registry_builds_the_collator_with_the_tokenizer_pad(builtin_host, toks):
    tok = toks.llama3()
    collator = builtin_host.registry.build("collator", "pad", {"pad_token_id": tok.pad_token_id})
    batch = collator(ROWS[:2])
    assert batch["input_ids"][1, 2:].eq(tok.pad_token_id).all()
