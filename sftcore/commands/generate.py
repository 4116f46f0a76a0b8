"""`sft generate`: answer with a trained model, prompting exactly as training did."""

from __future__ import annotations

import json

import click

from sftcore.commands.common import finished_run, host_from
from sftcore.errors import UsageError


def prompt_for(host, run_config: dict, row: dict) -> str:
    from sftcore.data.prepare import build_stage

    template = build_stage(host, run_config, "template")
    try:
        return template.format_prompt(row)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"the run's template cannot build a prompt from {sorted(row)}: {exc}; pass --row JSON") from None


@click.command("generate")
@click.option("--model", required=True, type=click.Path(), help="Output directory of `sft run`.")
@click.option("--instruction", help="The instruction.")
@click.option("--input", "context", help="Optional input/context for the instruction.")
@click.option("--row", "row_json", help="A whole data row as JSON, for templates with other fields.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy decoding.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--show-prompt", is_flag=True, help="Print the prompt before the answer.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.pass_context
def command(ctx, model, instruction, context, row_json, max_new_tokens, temperature, seed, show_prompt, no_progress) -> None:
    """Generate a response with the template the run was trained with."""
    run_config = finished_run(model, "--model")
    if row_json:
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
        raise UsageError("give --instruction TEXT (and optionally --input TEXT), or --row JSON")
    prompt = prompt_for(host_from(ctx), run_config, row)
    if show_prompt:
        click.echo(prompt)
    from sftcore.model.weights import transformers_bars

    from sftcore.data.prepare import model_path

    with transformers_bars(not no_progress):
        click.echo(generate(model, prompt, max_new_tokens, temperature, seed, base=model_path(run_config)))


def generate(
    model_dir: str, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0, base: str | None = None
) -> str:
    """``base``: the checkpoint an adapter run started from, which its adapter goes on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftcore.model.adapters import is_adapter_dir, load_adapter_model
    from sftcore.tokens import encode_prompts
    from sftcore.model.weights import loading

    torch.manual_seed(seed)
    with loading("model", model_dir):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if base is not None and is_adapter_dir(model_dir):
            model = load_adapter_model(model_dir, base)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    model.eval()
    ids = torch.tensor([encode_prompts(tokenizer, [prompt])[0]])
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
