"""Component protocols: what a factory registered through a hook must return.

These are structural (``typing.Protocol``): a plugin needs no base class, only the methods.
The host checks what each method returns where it calls it (`sftcore.boundary`, and
`sftcore.data.pipeline.check_masked` for maskers); each "Checked:" paragraph below says what is
refused, in one line naming the component and its plugin.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NotRequired, Protocol, TypedDict, runtime_checkable

from sftcore.data.segments import Segment
from sftcore.errors import DataError


class Masked(TypedDict):
    """One training row: ``input_ids`` and ``labels`` of equal length; ``labels`` is -100 where no loss."""

    input_ids: list[int]
    labels: list[int]
    truncated: NotRequired[str]
    """Set by a masker that cut the row: ``"prompt"`` or ``"response"`` (counted in the summary)."""


@runtime_checkable
class Template(Protocol):
    def format(self, example: Mapping[str, Any]) -> tuple[str, str] | list[Segment]:
        """Return ``(prompt, response)`` for one data row, or its `Segment` list (since 0.2).

        Segments: ordered texts, each ``trained`` or not; a masker puts before each trained one
        the inference prompt's ids (all the text before it, since a ``restart``, tokenized as one
        prompt) and encodes it on its own. The ``chat`` template returns them (one untrained and
        one trained per assistant turn), the ``alpaca`` templates two; a pair reads as
        ``[Segment(prompt), Segment(response, trained=True, eos=True)]``.

        ``prompt`` is exactly the text a user sends at inference (``sft generate`` formats
        with the same template). ``response`` is the text to learn, without an EOS marker:
        the masker appends EOS as a token id. Raise ``sftcore.errors.FieldError`` for a row
        that cannot be formatted (missing, mistyped or empty field); the host adds file and row.

        Checked: a non-empty list of `Segment` with ``str`` texts, or a tuple or list of exactly two
        ``str`` (``sftcore.tokens.Marked`` is one).
        """
        ...

    def format_prompt(self, example: Mapping[str, Any]) -> str:
        """The inference prompt for a row that has no response (``sft generate`` uses it).

        Contract: for a row ``format`` accepts, the text before its first trained segment (a pair's
        prompt) is ``format_prompt`` of that row without its response; for a conversation, of the
        conversation up to its last trained turn. Training and inference prompts cannot drift apart.

        Checked: a ``str``.
        """
        ...


@runtime_checkable
class Masker(Protocol):
    def __call__(self, prompt: str, response: str, tokenizer: Any, max_length: int) -> Masked:
        """Tokenize one (prompt, response) pair into ``input_ids`` and ``labels``.

        Contract: ``len(input_ids) == len(labels) <= max_length``; at least one label is not
        -100, otherwise raise ``sftcore.RowDropped(reason)``. A masker may also define
        ``batch(prompts, responses, tokenizer, max_length) -> list[Masked | RowDropped]``,
        which must return exactly what calling it row by row would; the host uses it for speed.
        Since 0.2 a masker may define ``segments(examples, tokenizer, max_length)``, taking each
        row's `Segment` list and returning per row a masked row, a ``RowDropped``, or for a
        conversation a ``sftcore.tokens.Outcome`` (its training rows, the reasons of turns
        left out); the host then masks every row through it, and a template answering with a
        conversation needs it.

        Checked, per row: a mapping; ``input_ids`` and ``labels`` lists (or arrays) of ints, not
        floats, bools or numpy floats; ids ``>= 0``, labels ``>= -100``; ``truncated``, if set,
        ``"prompt"`` or ``"response"``; and ``batch`` returns one result per pair.
        """
        ...


@runtime_checkable
class Collator(Protocol):
    def __call__(self, features: list[Masked]) -> dict[str, Any]:
        """Turn masked rows into a batch of tensors the model's ``forward`` accepts.

        Must contain ``input_ids`` and ``labels``; padding positions carry label -100. A
        collator may define ``batch_sampler(lengths, batch_size, seed) -> Iterable[list[int]]``
        to decide which rows share a batch (length grouping, packing to a token budget). The
        host draws the batches once per epoch with ``seed + epoch``, shuffles their order and
        gives each process its share; their number must not depend on the seed.
        A collator class whose batches hold no padding (examples told apart by ``position_ids``
        restarting at 0) sets ``padding_free = True``; the host then passes ``packing=True`` to
        a loader that accepts it, so it can pick a varlen attention kernel.

        Checked, every batch: a mapping whose ``input_ids`` and ``labels`` are 2-D integer
        ``torch.Tensor`` of one shape, ids ``>= 0``, labels a token id or -100.
        """
        ...


@runtime_checkable
class ModelLoader(Protocol):
    def load(self, model_name_or_path: str, **options: Any) -> tuple[Any, Any]:
        """Return ``(model, tokenizer)`` ready to train.

        The tokenizer pads on the right, has a pad token unless the loader was built with
        ``packing=True`` (the collator pads nothing), adds no EOS by itself, and has
        ``model_max_length`` set. Loading never executes code from the checkpoint unless the
        user passed ``trust_remote_code=True``. A loader may also define
        ``load_tokenizer(model_name_or_path, **options)``, returning the tokenizer prepared as
        ``load`` would, without weights; ``sft preview`` uses it.

        Checked: a pair whose model is a ``torch.nn.Module`` with a ``config`` and whose tokenizer
        has ``decode``, a numeric ``model_max_length`` and a ``pad_token_id`` that is an int or
        None (a padding-free collator needs none; the pad collator then refuses to be built, in
        one line). The built-in loader adds a pad token when the checkpoint has none.
        """
        ...


@runtime_checkable
class Adapter(Protocol):
    def apply(self, model: Any, tokenizer: Any) -> Any:
        """Return the model to train: ``model`` itself, changed or wrapped, whose parameters that
        train have ``requires_grad`` and the rest not.

        The run saves what the returned model's ``save_pretrained`` writes, in every checkpoint
        and at the end: a PEFT model writes ``adapter_config.json`` and
        ``adapter_model.safetensors``, never the base (`sft merge` folds them into it). An adapter
        may also define ``load_options() -> dict``: options the host adds to the loader's
        ``load`` call (``qlora``'s 4-bit ``quantization_config``).

        Checked: a model with a ``config`` and at least one parameter that trains.
        """
        ...


@runtime_checkable
class DataReader(Protocol):
    suffixes: Sequence[str]
    """File suffixes this reader handles, e.g. ``(".jsonl",)``."""

    def read(self, path: str) -> Iterator[tuple[int, Mapping[str, Any] | DataError]]:
        """Yield ``(row_number, row)``, numbered as a user finds rows in the file (1-based).

        A malformed row is yielded as a ``sftcore.errors.DataError`` in place of the row (the
        host stops or skips it, per ``--on-bad-row``); a malformed or unreadable file raises
        ``DataError``. Nothing else may escape.

        Checked: each item a ``(int, Mapping | DataError)`` tuple; another exception escaping
        is reported as the reader's failure. ``suffixes`` is a tuple or list of strings.
        """
        ...
