"""The model card: README.md with Hugging Face YAML front matter. Never a secret or a local path."""

from __future__ import annotations

from pathlib import Path

import tomli_w


def _front_matter(data: dict) -> str:
    lines = ["---"]
    for key, value in data.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {item}" for item in value]
        else:
            lines.append(f"{key}: {value}")
    lines.append("---")
    return "\n".join(lines)


def _diffusers_snippet(trigger: str, family: str) -> str:
    lines = [f'pipe.load_lora_weights("{trigger}_lora.safetensors")']
    if family == "sdxl":
        lines += [
            "from safetensors.torch import load_file",
            f'emb = load_file("embeddings/{trigger}.safetensors")',
            f'pipe.load_textual_inversion(emb["clip_l"], token="{trigger}", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)',
            f'pipe.load_textual_inversion(emb["clip_g"], token="{trigger}", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)',
        ]
    else:
        lines.append(f'pipe.load_textual_inversion("embeddings/{trigger}.safetensors", token="{trigger}")')
    return "\n".join(lines)


def model_card(
    *,
    name: str,
    trigger: str,
    base_model: str,
    license: str,
    selected_step: int,
    reason: str,
    metrics: dict[int, dict[str, float | None]],
    core_tags: list[str],
    dataset_counts: dict,
    train_summary: dict,
    previews: list[str],
    stand_in: bool,
    family: str = "sd1",
) -> str:
    base_name = base_model if not Path(base_model).is_absolute() else Path(base_model).name
    header = _front_matter(
        {
            "license": license,
            "base_model": base_name,
            "pipeline_tag": "text-to-image",
            "tags": ["lora", "stable-diffusion", "anime", "character", "lorafactory", "textual-inversion"],
            "instance_prompt": trigger,
        }
    )
    rows = ["| step | CCIP RecScore | image share | validation loss | selected |", "|---:|---:|---:|---:|:---:|"]
    for step in sorted(metrics):
        m = metrics[step]
        cells = ["missing" if m.get(k) is None else f"{m[k]:.3f}" for k in ("ccip_recscore", "ccip_image_share", "validation_loss")]
        rows.append(f"| {step} | {' | '.join(cells)} | {'**yes**' if step == selected_step else ''} |")
    warning = (
        "\n> **These files come from tiny random-initialised stand-in models (the offline demo).**\n"
        "> Neither the images nor the metrics mean anything.\n"
        if stand_in
        else ""
    )
    preview_md = "\n".join(f"![{Path(p).stem}]({p})" for p in previews)
    core = ", ".join(tag.replace("_", " ") for tag in core_tags) or "none"
    return f"""{header}

# {name} — character LoRA
{warning}
Trigger word: **`{trigger}`**. The trigger is a pivotal-tuning embedding trained together with the LoRA,
so load both (the bundled file does that in AUTOMATIC1111 and Forge).

Core tags learned by the trigger (add them to the prompt if a trait goes missing): {core}.

Recommended weights: LoRA 0.6–0.85, trigger 0.8–1.1.

## Files

| file | for |
|---|---|
| `{trigger}.safetensors` | AUTOMATIC1111 / Forge: LoRA with the embedding bundled (`bundle_emb.*`) |
| `{trigger}_lora.safetensors` | ComfyUI, diffusers and other tools: the plain kohya LoRA |
| `embeddings/{trigger}.safetensors`, `embeddings/{trigger}.pt` | the trigger embedding (ComfyUI: `embedding:{trigger}`; A1111 `embeddings/` folder; diffusers `load_textual_inversion`) |

diffusers:

```python
{_diffusers_snippet(trigger, family)}
```

## Step selection

Step **{selected_step}** was chosen automatically: {reason}.

{chr(10).join(rows)}

## Previews

{preview_md}

## Training

```toml
{tomli_w.dumps(train_summary).strip()}
```

Dataset: {", ".join(f"{k} {v}" for k, v in dataset_counts.items())}.
"""
