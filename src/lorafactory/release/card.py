"""The model card: README.md with Hugging Face YAML front matter. Never a secret or a local path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomli_w

_DATASET_KEYS = {
    "raw": "images crawled",
    "after_cleaning": "after cleaning",
    "dataset": "training images (with crops)",
}


@dataclass
class CardInput:
    name: str
    trigger: str
    base_model: str  # a hub id or a file/folder name, never a local path
    license: str
    kept: list[int]  # best first
    reason: str
    table: dict[int, dict[str, float | None]]
    labels: dict[str, str]  # metric column -> label, in display order
    intervals: dict[int, dict[str, list[float] | None]]
    missing: dict[str, str]  # metric -> why it is missing
    core_tags: list[str]
    dataset_counts: dict
    train_summary: dict
    previews: list[str]
    stand_in: bool
    family: str = "sd1"
    tags: tuple[str, ...] | list[str] = ()


def _yaml_scalar(value: object) -> str:
    text = str(value)
    return (
        text
        if text.replace("-", "").replace("_", "").replace("/", "").replace(".", "").isalnum()
        else '"' + text.replace('"', '\\"') + '"'
    )


def _front_matter(data: dict) -> str:
    lines = ["---"]
    for key, value in data.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {_yaml_scalar(item)}" for item in value]
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    lines.append("---")
    return "\n".join(lines)


def _diffusers_snippet(trigger: str, family: str) -> str:
    lines = [f'pipe.load_lora_weights("{trigger}_lora.safetensors")']
    if family == "sdxl":
        lines += [
            "from safetensors.torch import load_file",
            f'emb = load_file("embeddings/{trigger}.safetensors")',
            (
                f'pipe.load_textual_inversion(emb["clip_l"], token="{trigger}", '
                "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)"
            ),
            (
                f'pipe.load_textual_inversion(emb["clip_g"], token="{trigger}", '
                "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"
            ),
        ]
    else:
        lines.append(f'pipe.load_textual_inversion("embeddings/{trigger}.safetensors", token="{trigger}")')
    return "\n".join(lines)


def _cell(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "missing"
    return f"{value:.3f}" + (f" ({interval[0]:.2f}–{interval[1]:.2f})" if interval else "")


def metrics_table(card: CardInput) -> str:
    columns = [m for m in card.labels if any(card.table[s].get(m) is not None for s in card.kept)]
    header = "| step | " + " | ".join(card.labels[m] for m in columns) + " | files |"
    rows = [header, "|---:|" + "---:|" * len(columns) + ":---|"]
    for rank, step in enumerate(card.kept):
        cells = [_cell(card.table[step].get(m), (card.intervals.get(step) or {}).get(m)) for m in columns]
        label = f"**{step}** (best)" if rank == 0 else str(step)
        rows.append(f"| {label} | {' | '.join(cells)} | [LoRA](steps/{step}/{card.trigger}.safetensors) |")
    return "\n".join(rows)


def how_to_load_in_each_ui(trigger: str) -> list[tuple[str, str]]:
    """What each UI reads of the release (Forge and ComfyUI ignore the bundled embedding)."""
    return [
        ("AUTOMATIC1111", f"put `{trigger}.safetensors` in `models/Lora`; it brings the embedding with it"),
        (
            "Forge",
            f"put `{trigger}_lora.safetensors` in `models/Lora` and `embeddings/{trigger}.safetensors` in "
            "`embeddings/`: Forge does not read the embedding bundled in the LoRA file",
        ),
        (
            "ComfyUI",
            f"load `{trigger}_lora.safetensors` with a LoRA loader and put `embeddings/{trigger}.safetensors` in "
            f"`models/embeddings`, then write `embedding:{trigger}` in the prompt",
        ),
        ("diffusers", "`load_lora_weights` plus `load_textual_inversion`, as below"),
    ]


def model_card(card: CardInput) -> str:
    header = _front_matter(
        {
            "license": card.license,
            "base_model": card.base_model,
            "pipeline_tag": "text-to-image",
            "tags": [
                "lora",
                "stable-diffusion",
                "stable-diffusion-xl" if card.family == "sdxl" else "stable-diffusion-1.5",
                "anime",
                "character",
                "textual-inversion",
                "lorafactory",
                *card.tags,
            ],
            "instance_prompt": card.trigger,
        }
    )
    warning = (
        "\n> **These files come from tiny random-initialised stand-in models (the offline demo).**\n"
        "> Neither the images nor the metrics mean anything.\n"
        if card.stand_in
        else ""
    )
    best = card.kept[0]
    core = ", ".join(tag.replace("_", " ") for tag in card.core_tags) or "none"
    missing = "".join(f"\n- {card.labels.get(m, m)}: missing ({why})" for m, why in sorted(card.missing.items()))
    dataset = ", ".join(
        f"{_DATASET_KEYS[k]}: {card.dataset_counts[k]}" for k in _DATASET_KEYS if k in card.dataset_counts
    )
    preview_md = "\n".join(f"![{Path(p).stem}]({p})" for p in card.previews) or "(none)"
    how_to_load = "\n".join(f"- **{ui}**: {how}" for ui, how in how_to_load_in_each_ui(card.trigger))
    return f"""{header}

# {card.name}: character LoRA
{warning}
Trigger word: **`{card.trigger}`**. It is a pivotal-tuning embedding trained together with the LoRA: load
both.

{how_to_load}

Core tags learned by the trigger (add them to the prompt if a trait goes missing): {core}.

Recommended weights: LoRA 0.6–0.85, trigger 0.8–1.1.

## Files

| file | for |
|---|---|
| `{card.trigger}.safetensors` | LoRA + bundled embedding (`bundle_emb.*`), read whole by AUTOMATIC1111 only |
| `{card.trigger}_lora.safetensors` | the plain kohya LoRA: Forge, ComfyUI, diffusers and other tools |
| `embeddings/{card.trigger}.safetensors`, `embeddings/{card.trigger}.pt` | the trigger embedding alone |
| `steps/<step>/` | the same files for every kept step, with previews and per-image metrics |

diffusers:

```python
{_diffusers_snippet(card.trigger, card.family)}
```

## Step selection

Step **{best}** was chosen automatically: {card.reason}. Kept steps, best first (95% bootstrap intervals in brackets):

{metrics_table(card)}

All steps: `metrics.csv`.{missing}

![metrics against step](metrics_plot.png)

## Previews (step {best})

{preview_md}

## Training

Dataset: {dataset or "not recorded"}.

```toml
{tomli_w.dumps(card.train_summary).strip()}
```
"""
