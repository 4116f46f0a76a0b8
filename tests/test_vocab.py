"""The embedding rows sftcore checks token ids against, also where a process holds a shard only."""

from __future__ import annotations

import types

import torch

from sftcore.model.vocab import embedding_rows


def model_with(weight):
    embeddings = types.SimpleNamespace(weight=weight)
    return types.SimpleNamespace(get_input_embeddings=lambda: embeddings)


def test_a_zero3_partitioned_embedding_counts_its_full_rows():
    weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves in each process
    weight.ds_shape = torch.Size([32000, 64])
    assert embedding_rows(model_with(weight)) == 32000


def test_a_whole_embedding_counts_its_rows():
    assert embedding_rows(model_with(torch.nn.Parameter(torch.empty(300, 8)))) == 300
