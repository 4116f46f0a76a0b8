"""Conversations rendered with a model's own Jinja chat template, as the segments training learns.

For every assistant turn *i*, the prompt is the template's rendering of ``messages[:i]`` with
``add_generation_prompt=True``, exactly what a chat server tokenizes at inference; the reply is
what the template writes after that prompt in its rendering of ``messages[:i + 1]``, through
the first end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``,
EOS; harmony's ``<|return|>``) and nothing after it (not the newline after ``<|im_end|>``); other
special tokens in the reply (harmony's ``<|channel|>``) are the model's to write, so trained.

Marker strings written inside a message stay text: contents are escaped to private characters
before rendering, so every marker left in the rendering is the template's own, and only those
become token ids (`Encoder`). Reasoning tags (``<think>``) are not escaped: templates read them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

from sftcore.data.segments import Rendered, Segment
from sftcore.errors import FieldError, UsageError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# A message's keys say its style, under either field: OpenAI (role, content) or ShareGPT (from, value).
STYLES = {"role": ("role", "content", {r: r for r in ROLES}), "from": ("from", "value", SHAREGPT_ROLES)}
# Ends of a turn that a tokenizer may lack as tokens (ChatML on a tokenizer without <|im_end|>): still markers.
# Cohere's, Gemma 4's, muse-glimmer's and SmolVLM's too (not <|eom|>: it ends a message inside a turn).
END_TEXTS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<｜end▁of▁sentence｜>", "<|END_OF_TURN_TOKEN|>",
             "<turn|>", "<|eot|>", "<end_of_utterance>")
# Harmony (gpt-oss) closes each message with <|end|>, an analysis one inside a turn too; only these end the turn.
HARMONY_ENDS = ("<|return|>", "<|call|>")
REASONING_TAGS = frozenset({"<think>", "</think>"})
# Private-use code points standing for markers: content escapes from _ESCAPE, template tokens from _CODE.
_ESCAPE, _CODE, _END = 0x10F000, 0x10F800, 0x110000
_RESERVED = re.compile(f"[{chr(_ESCAPE)}-{chr(_END - 1)}]")
TRAIN_ON = ("assistant", "last", "all")
# A message's reasoning, where templates read it (Qwen3 reasoning_content, gpt-oss thinking): passed, escaped as content.
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
# Row keys the template would need but sftcore does not give it yet: such a row would train without them.
UNSUPPORTED_KEYS = ("images", "image", "videos", "tools", "functions", "function_call")


def messages_of(
    example: Mapping[str, Any], messages_field: str, conversations_field: str, *, reply: bool = True,
    reads: frozenset[str] = frozenset(), template: str = "in use",
) -> list[dict[str, str]]:
    """The row's conversation as ``{"role", "content"}`` dicts: OpenAI ``messages`` or ShareGPT
    ``conversations`` (``from``: system/human/gpt, ``value``), either style under either field; a bad message is a `FieldError`
    naming its index and key. ``reply``: it must hold an assistant message to learn. ``reads``:
    the `REASONING_FIELDS` the chat ``template`` reads; a message with another is refused."""
    for key in UNSUPPORTED_KEYS:
        if example.get(key):
            raise FieldError(key, "images, tools and functions are not supported yet (the chat template would train without them); "
                             "leave such rows out (--on-bad-row skip)", reason="unsupported")
    if messages_field in example:
        field, default = messages_field, "role"
    elif conversations_field in example:
        field, default = conversations_field, "from"
    else:
        raise FieldError(messages_field, f"is missing (a ShareGPT row has '{conversations_field}')", reason="missing-field")
    messages = example[field]
    if not isinstance(messages, list):
        raise FieldError(field, f"must be a list of messages, got {type(messages).__name__}", reason="wrong-type")
    if not messages:
        raise FieldError(field, "is empty", reason="empty-field")
    out = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        style = next((key for key in STYLES if isinstance(message, Mapping) and key in message), default)
        role_key, content_key, roles = STYLES[style]
        if not isinstance(message, Mapping):
            raise FieldError(where, f"must be an object with {role_key} and {content_key}", reason="wrong-type")
        if message.get("tool_calls") or message.get("function_call") or message.get(role_key) in ("tool", "function", "ipython", "function_call", "observation"):
            raise FieldError(where, "tool calls and tool results are not supported yet; leave such rows out (--on-bad-row skip)", reason="unsupported")
        role = roles.get(message.get(role_key)) if isinstance(message.get(role_key), str) else None
        if role is None:
            raise FieldError(f"{where}.{role_key}", f"must be one of {', '.join(roles)}, got {message.get(role_key)!r}", reason="bad-role")
        content = message.get(content_key)
        if isinstance(content, list):
            raise FieldError(f"{where}.{content_key}", "images and other content parts are not supported yet; give the text as a string", reason="unsupported")
        if not isinstance(content, str):
            got = "missing" if content is None else type(content).__name__
            raise FieldError(f"{where}.{content_key}", f"must be a string, got {got}", reason="wrong-type")
        _check_text(f"{where}.{content_key}", content)
        out.append({"role": role, "content": content, **_reasoning(message, where, reads, template)})
    if reply and not any(m["role"] == "assistant" for m in out):
        raise FieldError(field, "has no assistant message to learn", reason="no-reply")
    return out


def _check_text(where: str, text: str) -> None:
    if _RESERVED.search(text):
        raise FieldError(where, "holds a character in U+10F000-U+10FFFF, which sftcore reserves for template markers", reason="bad-text")


def _reasoning(message: Mapping[str, Any], where: str, reads: frozenset[str], template: str) -> dict[str, str]:
    """The message's reasoning fields, each a string the template reads (never dropped unsaid)."""
    out = {}
    for key in REASONING_FIELDS:
        if message.get(key) is None:
            continue
        if key not in reads:
            raise FieldError(f"{where}.{key}", f"the chat template {template} does not read it, so training would drop it; put the reasoning "
                             f"in the content as the model writes it, or use a template that reads {key}", reason="unsupported")
        if not isinstance(message[key], str):
            raise FieldError(f"{where}.{key}", f"must be a string, got {type(message[key]).__name__}", reason="wrong-type")
        _check_text(f"{where}.{key}", message[key])
        out[key] = message[key]
    return out


class Encoder:
    """Token ids of rendered text with the template's markers as their ids, marker strings in
    messages as text. A copy of the tokenizer's Rust backend in which each marker token is
    spelled with a private character (same id and flags, not special) and every other special
    token is text (``encode_special_tokens``): around a marker the copy splits, strips and
    normalizes exactly as the tokenizer's own call does, since it is the same code. Where the
    copy cannot keep the ids (checked), the twins are added tokens of their own, their ids mapped
    back after encoding."""

    def __init__(self, tokenizer: Any, markers: Sequence[str]) -> None:
        from tokenizers import Tokenizer

        from sftcore.tokens import _plain_backend

        backend = _plain_backend(tokenizer)
        if backend is None:
            raise UsageError("the chat template needs a fast tokenizer (a tokenizer.json) without truncation or padding set")
        text = backend.to_str()
        self.token_markers = [m for m in markers if m in {t["content"] for t in json.loads(text).get("added_tokens", [])}]
        self.copy, self.ids = _renamed(text, self.token_markers), {}
        if self.copy is None:
            self.copy, self.ids = _twinned(text, self.token_markers, len(tokenizer))
        self.copy.encode_special_tokens = True
        self.lowest = min(self.ids, default=None)

    def __getstate__(self) -> dict[str, Any]:  # workers get the copy as JSON
        return {**self.__dict__, "copy": self.copy.to_str()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, copy=_copy_from(state.pop("copy")))

    def encode(self, coded: Sequence[str]) -> list[list[int]]:
        encode = getattr(self.copy, "encode_batch_fast", self.copy.encode_batch)
        out = []
        for encoding in encode(list(coded), add_special_tokens=False):
            ids = encoding.ids
            if self.lowest is not None and ids and max(ids) >= self.lowest:
                ids = [self.ids.get(i, i) for i in ids]
            out.append(ids)
        return out


def _renamed(text: str, markers: Sequence[str]) -> Any | None:
    """The backend with each marker's added token (and vocabulary entry) spelled as its private
    character; None where that changes any id (a vocabulary that is not a dict, say)."""
    from tokenizers import Tokenizer

    spec = json.loads(text)
    before = {t["content"]: t["id"] for t in spec["added_tokens"]}
    vocab = spec.get("model", {}).get("vocab")
    renamed = {m: chr(_CODE + k) for k, m in enumerate(markers)}
    for token in spec["added_tokens"]:
        if token["content"] in renamed:
            twin = renamed[token["content"]]
            if isinstance(vocab, dict) and token["content"] in vocab:
                vocab[twin] = vocab.pop(token["content"])
            token.update(content=twin, special=False)
    try:
        copy = Tokenizer.from_str(json.dumps(spec))
    except Exception:  # a merge that spells a marker: the renamed vocabulary cannot hold it
        return None
    same = all(copy.token_to_id(renamed.get(content, content)) == id for content, id in before.items())
    return copy if same else None


def _twinned(text: str, markers: Sequence[str], size: int) -> tuple[Any, dict[int, int]]:
    """The backend with a twin added token per marker, and the twins' ids -> the markers'."""
    from tokenizers import Tokenizer

    spec = json.loads(text)
    tokens = {t["content"]: t for t in spec["added_tokens"]}
    spec["added_tokens"] += [{**tokens[m], "content": chr(_CODE + k), "special": False, "id": size + k} for k, m in enumerate(markers)]
    copy = Tokenizer.from_str(json.dumps(spec))
    return copy, {copy.token_to_id(chr(_CODE + k)): tokens[m]["id"] for k, m in enumerate(markers)}


_COPIES: dict[str, Any] = {}  # a worker process builds each copy once, not once per batch it is sent


def _copy_from(spec: str) -> Any:
    import hashlib

    from tokenizers import Tokenizer

    key = hashlib.blake2b(spec.encode(), digest_size=16).hexdigest()
    if key not in _COPIES:
        _COPIES[key] = Tokenizer.from_str(spec)
        _COPIES[key].encode_special_tokens = True
    return _COPIES[key]


class ChatRenderer:
    """One chat template and tokenizer: renders conversations and splits them into segments."""

    def __init__(self, tokenizer: Any, template: str, name: str) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.name = name
        # the reasoning fields its text reads (message.thinking, "thinking" in message)
        self.reads = frozenset(k for k in REASONING_FIELDS if re.search(rf"\.{k}\b|['\"]{k}['\"]", template))
        self.compiled = _compile_jinja_template(template)  # the compiler and cache apply_chat_template uses
        self.variables = dict(tokenizer.special_tokens_map)  # bos_token, eos_token... as apply_chat_template passes them
        specials = {str(t) for t in tokenizer.all_special_tokens}
        specials |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
        markers = sorted((specials | set(END_TEXTS)) - REASONING_TAGS - {""}, key=lambda m: (-len(m), m))
        if len(markers) > _CODE - _ESCAPE:
            raise UsageError(f"the tokenizer has {len(markers)} special tokens; the chat template handles up to {_CODE - _ESCAPE}")
        self.markers = markers
        self.index = {m: k for k, m in enumerate(markers)}
        self.find = re.compile("|".join(map(re.escape, markers)))
        harmony = "<|return|>" in specials
        ends = HARMONY_ENDS if harmony else (*END_TEXTS, str(tokenizer.eos_token or ""))
        self.ends = [m for m in markers if m in ends]
        self.end_find = re.compile("|".join(map(re.escape, self.ends)))
        self.encoder = Encoder(tokenizer, markers)
        coded = {m: chr(_CODE + k) for k, m in enumerate(self.encoder.token_markers)}
        escaped = {chr(_ESCAPE + k): m for k, m in enumerate(markers)}
        self._to_coded = {**coded, **escaped}
        self._to_text = escaped
        self._coded_find = re.compile("|".join([re.escape(m) for m in coded] + [f"[{chr(_ESCAPE)}-{chr(_CODE - 1)}]"]))
        self._text_find = re.compile(f"[{chr(_ESCAPE)}-{chr(_CODE - 1)}]")

    def escape(self, messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        sub = lambda m: chr(_ESCAPE + self.index[m.group()])  # noqa: E731
        return [{**m, **{k: self.find.sub(sub, m[k]) for k in ("content", *REASONING_FIELDS) if k in m}} for m in messages]

    def render(self, escaped: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
        """The template's text, contents escaped; a template that raises is the row's `FieldError`."""
        try:
            return self.compiled.render(messages=list(escaped), add_generation_prompt=generation_prompt, **self.variables)
        except Exception as exc:  # jinja's raise_exception, an undefined variable, a type error in the template
            message = self._text_find.sub(lambda m: self._to_text[m.group()], str(exc))
            raise FieldError("messages", f"the chat template {self.name} refused the conversation: {message}", reason="template-refused") from None

    def text(self, escaped: str) -> Rendered:
        readable = self._text_find.sub(lambda m: self._to_text[m.group()], escaped)
        coded = self._coded_find.sub(lambda m: self._to_coded[m.group()], escaped)
        return Rendered(readable, coded, self.encoder)

    def reply(self, prompt: str, whole: str) -> tuple[str, str]:
        """``(reply, "")``: the text after ``prompt`` in ``whole`` through its first end-of-turn
        marker; or ``("", reason)`` where the turn cannot be trained on its inference prompt."""
        if not whole.startswith(prompt):
            return "", "reply-not-after-prompt"
        end = self.end_find.search(whole, len(prompt))
        if end is None:
            return "", "no-end-marker"
        return whole[len(prompt) : end.end()], ""

    def segments(self, messages: Sequence[Mapping[str, str]], train_on: str) -> list[Segment]:
        """The conversation as segments: for each trained turn its inference prompt (after the
        previous turn's reply when the rendering continues it, else restarting) and its reply."""
        escaped = self.escape(messages)
        if train_on == "all":
            return [Segment(self.text(self.render(escaped, False)), trained=True)]
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on == "last":
            replies = replies[-1:]
        out: list[Segment] = []
        before = None  # the escaped text of the segments so far, since the last restart
        for i in replies:
            prompt = self.render(escaped[:i], True)
            reply, reason = self.reply(prompt, self.render(escaped[: i + 1], False))
            if before is not None and prompt.startswith(before):
                head = Segment(self.text(prompt[len(before) :]))
            else:
                head = Segment(self.text(prompt), restart=before is not None)
            out.append(head)
            if reason:
                out.append(Segment(self.text(""), left_out=reason))
                before = prompt
                continue
            out.append(Segment(self.text(reply), trained=True))
            before = prompt + reply
        return out

    def prompt(self, messages: Sequence[Mapping[str, str]]) -> Rendered:
        """The inference prompt after ``messages``: what ``sft generate`` tokenizes."""
        return self.text(self.render(self.escape(messages), True))


def template_text(tokenizer: Any, path: str | None) -> tuple[str, str]:
    """The Jinja text to render with and how to name it: the file given, else the tokenizer's."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8"), Path(path).name
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"chat_template={path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    text = getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):  # named templates: the default one renders conversations
        text = text.get("default")
    source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{source} has no chat template; pass --template-opt chat_template=FILE.jinja")
    return text, f"of {source}"


def probe(renderer: ChatRenderer) -> None:
    """Refuse, in one line, a template no turn of which could be trained honestly: one whose
    generation prompt adds nothing (the role header would be learned), whose replies never
    continue their generation prompt (one that opens ``<think>`` in the prompt but renders turns
    without it), or whose reply holds no content before its end marker."""
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi there."}]
    escaped = renderer.escape(messages)
    try:
        prompt, whole = renderer.render(escaped[:1], True), renderer.render(escaped, False)
        bare = renderer.render(escaped[:1], False)
    except FieldError:
        return  # a template with rules of its own (a required system message): each row's error says so
    reply, reason = renderer.reply(prompt, whole)
    header = reply.partition(messages[1]["content"])[0] if messages[1]["content"] in reply else ""
    # Mistral's prompt ends with the user turn's [/INST]: nothing to add, nothing but content after it.
    if prompt == bare and not reason and header.strip():
        raise UsageError(
            f"the chat template {renderer.name} adds nothing for add_generation_prompt, so the assistant's role header "
            "would be trained as its reply; pass --template-opt chat_template=FILE.jinja with a template that writes "
            "the assistant header when add_generation_prompt is set"
        )
    if not reason and messages[1]["content"] not in reply[: renderer.end_find.search(reply).start()]:
        raise UsageError(
            f"the chat template {renderer.name} writes {str(renderer.text(reply))!r} for the reply 'Hi there.', no content "
            "before its end marker; pass --template-opt chat_template=FILE.jinja with a template that writes the reply"
        )
    if reason == "reply-not-after-prompt":
        added = renderer.text(prompt[len(bare) :] if prompt.startswith(bare) else prompt[_common(prompt, whole) :])
        raise UsageError(
            f"the chat template {renderer.name} adds {str(added)!r} for its generation prompt, which its rendering of "
            "an assistant turn does not continue, so no turn can be trained on the prompt the model gets at inference; "
            "pass --template-opt chat_template=FILE.jinja with a template whose turns continue its generation prompt"
        )
    if reason == "no-end-marker":
        ends = [m for m in renderer.ends if m in renderer.encoder.token_markers] or renderer.ends  # the tokenizer's own
        raise UsageError(
            f"the chat template {renderer.name} writes {str(renderer.text(whole[len(prompt) :]))!r} for the reply 'Hi there.', "
            f"with no end-of-turn marker ({', '.join(ends)}), so the model would never learn to stop; pass "
            "--template-opt chat_template=FILE.jinja with a template that ends each turn with one"
        )


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def stop_ids(tokenizer: Any, prompt: str) -> int | list[int]:
    """Where generation stops: EOS, and after a chat prompt the end-of-turn tokens too (Llama 3's
    ``<|eot_id|>``, Gemma's ``<end_of_turn>``), since the template ends a reply with one."""
    eos = tokenizer.eos_token_id
    if not isinstance(prompt, Rendered):
        return eos
    added = tokenizer.get_added_vocab()
    ends = HARMONY_ENDS if "<|return|>" in added else END_TEXTS  # harmony's <|end|> closes a message, not the turn
    return list(dict.fromkeys([i for i in [eos] if i is not None] + [added[t] for t in ends if t in added]))
