"""Hook specifications: the contract between the sftcore host and its plugins.

Every pipeline stage is contributed through a *registration hook*. The host calls each
registration hook once per plugin with a ``register`` callable::

    register(name: str, factory: Callable[..., Component], *,
             description: str = "", override: bool = False) -> None

``factory(**options)`` builds the component; options come from the command line
(``--template-opt key=value``) or the YAML config and are checked against the factory's
signature before anything heavy runs. The component protocols are in ``sftcore.protocols``.

Host-provided options: the host passes these itself to a factory that takes an option of that
name (or ``**kwargs``), unless the user set it (the table is `sftcore.options.HOST_OPTIONS`)::

    template  tokenizer            the run's tokenizer, loaded without weights (a chat template renders with it)
    collator  pad_token_id         the loaded tokenizer's pad token id (None when it has none)
    collator  attn_implementation  the attention implementation the model loaded with
    loader    packing              True when the run's collator is padding-free

A factory may require them (no default) without the user passing them.

``register`` refuses a call that breaks this signature (a name that is not a non-empty
string, a factory that is not callable, a description that is not a string, an override that
is not a bool): the plugin is reported in one line and left out whole, as is one whose hook
raises, calls ``sys.exit``, or runs past ``SFT_PLUGIN_TIMEOUT`` seconds (default 60; 0: no
limit). Anything a plugin prints while it loads and registers goes to stderr.

The host checks every component's answers against its protocol (`sftcore.boundary`): a
template's segments or ``(prompt, response)`` strings, a reader's ``(row_number, row)`` pairs, a masker's
int ids and labels, a collator's 2-D integer tensors, a loader's ``(model, tokenizer)``, an
adapter's model with something to train. A wrong answer stops the command with a one-line
`sftcore.errors.PluginError` naming the component, its plugin and distribution.

All hooks here are *collecting* hooks (every plugin is called; none is first-result-wins),
so the order in which plugins load never decides which component is used: the user picks
by name, and two plugins registering the same (stage, name) is an error unless one of
them passes ``override=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import pluggy

from sftcore import PROJECT

hookspec = pluggy.HookspecMarker(PROJECT)


class Register(Protocol):
    """The ``register`` callable handed to every registration hook."""

    def __call__(
        self, name: str, factory: Callable[..., Any], *, description: str = "", override: bool = False
    ) -> None: ...


@hookspec
def register_templates(register: Register) -> None:
    """Register prompt templates (stage ``template``).

    :param register: call ``register(name, factory, description=..., override=...)`` once per
        template. ``factory(**options)`` must return an object satisfying
        ``sftcore.protocols.Template``: ``format(example)`` returns a list of
        ``sftcore.protocols.Segment`` (text, trained or not), or a ``(prompt, response)`` pair,
        which the host reads as two segments, the response trained and followed by EOS.

    Return value: ignored. Called on every plugin. Since 0.1; segments since 0.2 (a template
    answering pairs needs no change; one that trains several parts of a row, a conversation's
    turns, returns segments and is masked by the built-in maskers' ``segments()``).
    """


@hookspec
def register_maskers(register: Register) -> None:
    """Register maskers (stage ``masker``): text pair to ``input_ids`` and ``labels``.

    :param register: as for ``register_templates``; ``factory(**options)`` returns a
        ``sftcore.protocols.Masker``. A masker raises ``sftcore.RowDropped(reason)`` for a row
        that would have no supervised token; it never returns all labels ``-100``, nor only the
        first label supervised (the loss shifts labels by one, so that one is never predicted).

    Return value: ignored. Called on every plugin. Since 0.1.
    """


@hookspec
def register_collators(register: Register) -> None:
    """Register collators (stage ``collator``): list of masked rows to a batch of tensors.

    :param register: as for ``register_templates``; ``factory(**options)`` returns a
        ``sftcore.protocols.Collator``. The host passes the tokenizer's pad id as the
        ``pad_token_id`` option when the factory accepts one; it is None when the tokenizer has
        no pad token, which a factory typed ``pad_token_id: int`` refuses in one line.

    Return value: ignored. Called on every plugin. Since 0.1.
    """


@hookspec
def register_model_loaders(register: Register) -> None:
    """Register model loaders (stage ``loader``): checkpoint path to (model, tokenizer).

    :param register: as for ``register_templates``; ``factory(**options)`` returns a
        ``sftcore.protocols.ModelLoader``.

    Return value: ignored. Called on every plugin. Since 0.1.
    """


@hookspec
def register_data_readers(register: Register) -> None:
    """Register data readers (stage ``reader``): a file to an iterator of rows.

    :param register: as for ``register_templates``; ``factory(**options)`` returns a
        ``sftcore.protocols.DataReader``. The host picks a reader by the file's suffix
        unless one is named with ``--reader``, reading ``suffixes`` from the factory (a class
        attribute) without building it; only a factory without one is built, with no options,
        to learn its reader's; a reader that declares its suffixes is built only when it matches.

    Return value: ignored. Called on every plugin. Since 0.1.
    """


@hookspec
def register_adapters(register: Register) -> None:
    """Register adapters (stage ``adapter``): which of the loaded model's parameters train.

    :param register: as for ``register_templates``; ``factory(**options)`` returns a
        ``sftcore.protocols.Adapter``. The host builds it before anything loads or is written,
        so a factory refuses there, in one line, a package that is missing or a machine it cannot
        run on; it calls ``apply(model, tokenizer)`` once, on the loader's model, before
        training. The default, ``none``, trains every parameter.

    Return value: ignored. Called on every plugin. Since 0.2.
    """


@hookspec
def trainer_callbacks(config: Mapping[str, Any]) -> list[Any] | None:
    """Contribute ``transformers.TrainerCallback`` instances to a training run.

    :param config: the effective run configuration (read-only), as saved next to the model
        in ``sft_config.yaml``.
    :return: a list of callbacks (possibly empty) or ``None``; each item a ``TrainerCallback``
        instance or subclass (the Trainer instantiates a class). Anything else (a string, a
        number, a list holding one) is a `sftcore.errors.PluginError` naming the plugin. Called
        on every plugin; the lists are concatenated in plugin load order. Since 0.1.
    """
