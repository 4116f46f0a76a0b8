"""`sft generate`: answer with a trained model, prompting exactly as training did."""

from __future__ import annotations

import json
import sys

import click

from sftcore.commands.common import finished_run, host_from
from sftcore.errors import UsageError


def prompt_for(host, run_config: dict, row: dict, model: str | None = None) -> str:
    """The inference prompt for ``row``, by the run's template (given the run's tokenizer, from
    ``model``, when it renders with one, as a chat template does)."""
    return prompter(host, run_config, model)(row)


def prompter(host, run_config: dict, model: str | None = None):
    """``row -> prompt`` with the run's template, built once."""
    from sftcore.data.prepare import build_stage, load_tokenizer, template_takes_tokenizer

    tokenizer = {"tokenizer": load_tokenizer(host, run_config, model)} if model and template_takes_tokenizer(host, run_config) else {}
    template = build_stage(host, run_config, "template", **tokenizer)

    def prompt(row: dict) -> str:
        try:
            return template.format_prompt(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"the run's template cannot build a prompt from {sorted(row)}: {exc}; pass --row JSON") from None

    return prompt


def conversation(messages: tuple[str, ...], run_config: dict) -> dict:
    """``--message`` texts in turn, user first (user, assistant, user...), as a row of the run's template."""
    if len(messages) % 2 == 0:  # the last would be the assistant's, and there would be nothing to answer
        raise UsageError(
            f"--message was given {len(messages)} times: give an odd number, user first (user, assistant, "
            "user...), and the model answers the last"
        )
    field = run_config["template"]["options"].get("messages_field", "messages")
    roles = ("user", "assistant")
    return {field: [{"role": roles[i % 2], "content": text} for i, text in enumerate(messages)]}


@click.command("generate")
@click.option("--model", required=True, type=click.Path(), help="Output directory of `sft run`.")
@click.option("--instruction", help="The instruction.")
@click.option("--input", "context", help="Optional input/context for the instruction.")
@click.option("--row", "row_json", help="A whole data row as JSON, for templates with other fields.")
@click.option("--message", "messages", multiple=True,
              help="A chat run's conversation, one message per option, user first (user, assistant, user...); the model answers the last.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy decoding.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--show-prompt", is_flag=True, help="Print the prompt before the answer.")
@click.option("--base", type=click.Path(), help="An adapter run's base model, if it has moved (default: its config's model).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.pass_context
def command(ctx, model, instruction, context, row_json, messages, max_new_tokens, temperature, seed, show_prompt, base, no_progress) -> None:
    """Generate a response with the template the run was trained with.

    On a chat run with no --message and a terminal on stdin: a conversation, one line a message.
    """
    run_config = finished_run(model, "--model")
    from sftcore.data.prepare import model_path
    from sftcore.model.adapters import adapter_base, is_adapter_dir

    if is_adapter_dir(model):  # only then is the base needed (the built-in one is made on first use)
        base = adapter_base(model, base or model_path(run_config))
    from sftcore.model.weights import transformers_bars

    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    if not (row_json or instruction is not None or messages) and run_config["template"]["name"] == "chat" and sys.stdin.isatty():
        prompt = prompter(host_from(ctx), run_config, model)
        with transformers_bars(not no_progress):
            loaded = load(model, base=base)
        chat_loop(lambda history: answer(*loaded, prompt(conversation(history, run_config)), **settings))
        return
    if messages:
        row = conversation(messages, run_config)
    elif row_json:
        try:
            row = json.loads(row_json)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--row is not valid JSON: {exc}") from None
    elif instruction is not None:
        options = run_config["template"]["options"]
        row = {options.get("instruction_field", "instruction"): instruction}
        if context:
            row[options.get("input_field", "input")] = context
    else:
        raise UsageError("give --instruction TEXT (and optionally --input TEXT), or --row JSON, or on a chat run --message TEXT")
    prompt = prompt_for(host_from(ctx), run_config, row, model)
    if show_prompt:
        click.echo(prompt)
    with transformers_bars(not no_progress):
        click.echo(generate(model, prompt, max_new_tokens, temperature, seed, base=base))


def chat_loop(reply, read=input, write=click.echo) -> None:
    """Read a message a line, answer it with ``reply(history)``, until an empty line or end of input."""
    history: list[str] = []
    while True:
        try:
            text = read("> ")
        except (EOFError, KeyboardInterrupt):
            return
        if not text.strip():
            return
        history.append(text)
        history.append(reply(tuple(history)))
        write(history[-1])


def generate(
    model_dir: str, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0, base: str | None = None
) -> str:
    """``base``: the checkpoint an adapter run started from, which its adapter goes on."""
    return answer(*load(model_dir, base), prompt, max_new_tokens, temperature, seed)


def load(model_dir: str, base: str | None = None) -> tuple:
    """``(model, tokenizer)`` of a finished run, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftcore.model.adapters import is_adapter_dir, load_adapter_model
    from sftcore.model.weights import loading

    with loading("model", model_dir):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if base is not None and is_adapter_dir(model_dir):
            model = load_adapter_model(model_dir, base)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    model.eval()
    return model, tokenizer


def answer(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> str:
    """The model's answer to ``prompt``, encoded as training encoded it (a chat template's markers as ids)."""
    import torch

    from sftcore.data.chat import stop_ids
    from sftcore.data.segments import encode_prompt_texts

    torch.manual_seed(seed)
    ids = torch.tensor([encode_prompt_texts(tokenizer, [prompt])[0]])
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids(tokenizer, prompt),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
