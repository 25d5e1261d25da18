"""AUTOMATIC1111's emphasis syntax: parsed as A1111 parses it, applied as A1111 applies it."""

import pytest
import torch

from lorafactory.evaluate.attention import parse_attention, plain_text
from lorafactory.evaluate.metrics import prompt_tags
from lorafactory.train.embedding import encode_text, text_core
from lorafactory.train.model import load_pipeline
from lorafactory.train.text import BREAK, CHUNK, emphasise, encode_prompts, encode_weighted


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a (b) [c] (d:1.5)", [("a ", 1.0), ("b", 1.1), (" ", 1.0), ("c", 1 / 1.1), (" ", 1.0), ("d", 1.5)]),
        ("((e)), [[f]]", [("e", 1.1 * 1.1), (", ", 1.0), ("f", 1 / 1.1 / 1.1)]),
        ("(g, (h:2):0.5)", [("g, ", 0.5), ("h", 1.0)]),
        (r"surtr \(arknights\), \\", [("surtr (arknights), \\", 1.0)]),
        ("(unclosed, x", [("unclosed, x", 1.1)]),
        ("a ) b ] c:1.5)", [("a ) b ] c:1.5)", 1.0)]),  # closers without an opener stay text
        ("(b:x)", [("b:x", 1.1)]),
        ("x BREAK y", [("x", 1.0), ("BREAK", BREAK), ("y", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_follows_a1111(prompt, expected):
    parsed = parse_attention(prompt)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


def test_plain_text_feeds_tag_matching():
    assert plain_text("(worst quality, low quality:1.4), [sketch]") == "worst quality, low quality, sketch"
    vocabulary = {"bikini", "beach", "night"}
    assert prompt_tags("(night:1.2), beach, ((bikini))", vocabulary) == ["night", "beach", "bikini"]


@pytest.fixture(scope="module")
def clip(kit):
    pipe = load_pipeline(str(kit.tiny_sd))
    with torch.no_grad():  # a trained CLIP's final norm has a bias, so its states have a mean to restore
        text_core(pipe.text_encoder).final_layer_norm.bias.fill_(0.25)
    return pipe.tokenizer, pipe.text_encoder


def test_a_mean_too_close_to_zero_is_not_restored():
    hidden = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    weighted = emphasise(hidden, torch.tensor([[1.0, 2.0]]))
    assert torch.equal(weighted, torch.tensor([[[1.0, -1.0], [4.0, -4.0]]]))


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_emphasis_matches_a_hand_computed_embedding(clip):
    tok, enc = clip
    cpu = torch.device("cpu")
    smile, rest = _ids(tok, "smile"), _ids(tok, ", red hair")
    row = [tok.bos_token_id, *smile, *rest, tok.eos_token_id]
    row += [tok.pad_token_id] * (CHUNK + 2 - len(row))
    weights = [1.0] + [1.5] * len(smile) + [1.0] * (len(row) - 1 - len(smile))
    with torch.no_grad():
        z = encode_text(enc, torch.tensor([row]), 2)[0]  # [77, D]
        expected = z.clone()
        for position, weight in enumerate(weights):
            expected[position] *= weight
        expected *= z.mean() / expected.mean()
        ours = encode_weighted("sd1", [tok], [enc], [parse_attention("(smile:1.5), red hair")], 2, cpu).hidden[0]
        plain = encode_prompts("sd1", [tok], [enc], ["smile, red hair"], 2, cpu).hidden[0]
        same = encode_weighted("sd1", [tok], [enc], [parse_attention("smile, red hair")], 2, cpu).hidden[0]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(same, plain)  # no emphasis: exactly the plain encoding
    assert (ours - plain).abs().max() > 1e-3


def test_break_starts_a_new_chunk(clip):
    tok, enc = clip
    with torch.no_grad():
        broken = encode_weighted(
            "sd1", [tok], [enc], [parse_attention("smile BREAK red hair")], 2, torch.device("cpu")
        )
        second = encode_prompts("sd1", [tok], [enc], ["red hair"], 2, torch.device("cpu"))
    assert broken.hidden.shape[1] == 2 * (CHUNK + 2)
    torch.testing.assert_close(broken.hidden[:, CHUNK + 2 :], second.hidden)
