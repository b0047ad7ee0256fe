"""`sailvl convert compose`: AIMv2 + Qwen3 directories -> a complete, chat-ready SAIL-VL2 directory."""

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Aimv2VisionConfig, Aimv2VisionModel, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, \
    Qwen3MoeForCausalLM

import sailvl
import sailvl.checkpoint.imports
from sailvl.cli import main


def _llm_tokenizer(path, vocab_size):
    """A Qwen-like tokenizer with the chat tokens but without the image tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["what is in the picture? a cat on a mat."] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}, "eos_token": "<|im_end|>"}))
    return tok


@pytest.fixture
def parts(tmp_path):
    vision, llm = tmp_path / "aimv2", tmp_path / "qwen3"
    Aimv2VisionModel(Aimv2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=56, patch_size=14)).save_pretrained(vision)
    llm.mkdir()
    tok = _llm_tokenizer(llm, 300)
    n = tok.get_vocab_size()
    hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=n, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                      tie_word_embeddings=False)).eval()
    hf.save_pretrained(llm)
    return vision, llm, hf, n


def test_compose_cli_builds_a_complete_model_dir(parts, tmp_path, capsys):
    vision, llm, hf, n = parts
    out = tmp_path / "sailvl"
    assert main(["convert", "compose", "--vision", str(vision), "--llm", str(llm), "--out", str(out)]) == 0
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = [tok.token_to_id(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")]
    assert ids == [n, n + 1, n + 2]
    added = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert added[str(n + 2)]["content"] == "<IMG_CONTEXT>"
    model = sailvl.SailVL.from_pretrained(out)
    cfg = model.config
    assert cfg.img_context_token_id == n + 2 and cfg.llm_config.vocab_size == n + 3
    assert cfg.tokens_per_tile == 4  # 56 px / 14 = 4x4 patches -> 2x2 after pixel shuffle
    # the LLM is the imported one: text-only logits equal transformers' on the original rows
    text = torch.randint(0, n, (1, 9))
    with torch.no_grad():
        assert (model(text).logits[0, :, :n] - hf(text).logits[0]).abs().max() <= 1e-4
    emb = model.language_model.model.embed_tokens.weight
    assert torch.allclose(emb[n:], emb[:n].mean(0).expand(3, -1))
    # and the directory is chat-ready
    answer = sailvl.load(out).chat(Image.new("RGB", (80, 60), "red"), "what is this?", max_new_tokens=5)
    assert isinstance(answer, str)


def test_compose_moe_llm_and_bad_inputs(tmp_path, parts):
    vision, llm, _, n = parts
    moe = tmp_path / "moe"
    Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=n + 10, hidden_size=48, intermediate_size=64,
                                       moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=12, num_experts=4,
                                       num_experts_per_tok=2)).save_pretrained(moe)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (moe / f).write_bytes((llm / f).read_bytes())
    out = tmp_path / "out"
    sailvl.checkpoint.imports.compose(vision, moe, out, select_layer=-2)
    model = sailvl.SailVL.from_pretrained(out)
    assert model.config.llm_config.num_experts == 4 and model.config.llm_config.vocab_size == n + 10
    assert model.config.select_layer == -2
    # a directory without weights, and a missing tokenizer, are clear errors
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((llm / "config.json").read_text())
    assert main(["convert", "compose", "--vision", str(vision), "--llm", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "x")]) == 1
    (llm / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        sailvl.checkpoint.imports.compose(vision, llm, tmp_path / "y")
