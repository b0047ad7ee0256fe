"""Tokenizers in the HF `tokenizer.json` format: load one from a model directory, or train a small
byte-level BPE carrying every special token SAIL-VL2 uses (for tiny models trained from scratch).
Special token ids are always read from the tokenizer, never hard-coded."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
# The HF tokenizer / chat-template files a model directory may carry (copied as a set by compose, the
# processor and model soup).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "tokenizer.model", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")
# As in Qwen3: whole tokens, but not "special", so decoding keeps them and thinking can be parsed.
THINK_TOKENS = ["<think>", "</think>"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    f = Path(path) / "tokenizer.json"
    if not f.exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{f} is not a valid tokenizer.json: {e}") from None


def token_id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no {token!r} token")
    return i


# The pre-tokenizer split of Qwen2 / Qwen3 tokenizers (contractions, letters with one leading non-letter,
# single digits, punctuation runs, newlines, spaces).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
# The same split with capital letters as pieces of their own, like digits, unless they start a lowercase word
# ("row KN" -> row, " ", K, N; "Describe" stays whole): a small BPE trained on data full of letter codes (OCR
# answers, chart and table labels) would otherwise spend merges on letter pairs and give " K", "K" and '"K'
# different tokens, and a model must then learn every pair and every variant as an unrelated token.
CAPITALS_SPLIT = QWEN_SPLIT.replace(r"[^\r\n\p{L}\p{N}]?\p{L}+",
                                    r"[^\r\n\p{L}\p{N}]?\p{Lu}?[^\P{L}\p{Lu}]+|\p{L}")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def corpus_texts(paths: Iterable[str | Path]) -> Iterable[str]:
    """Text for tokenizer training: lines of .txt files; every message / conversation value of .jsonl
    records (LLaVA `conversations`, OpenAI `messages` with string or text-part content). Malformed JSON
    lines are skipped (and counted by the caller if it cares)."""
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        with open(path, encoding="utf-8", errors="replace") as fh:
            if path.suffix != ".jsonl":
                yield from fh
                continue
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                for turn in rec.get("conversations", []) + rec.get("messages", []):
                    if not isinstance(turn, dict):
                        continue
                    role = ROLES.get(str(turn.get("from", turn.get("role", ""))))
                    if role is not None:  # the chat template writes the role after <|im_start|>
                        yield role + "\n"
                    content = turn.get("value", turn.get("content", ""))
                    if isinstance(content, list):
                        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                    if isinstance(content, str):
                        yield content.replace("<image>", "").replace("<video>", "")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, split_capitals: bool = False) -> Tokenizer:
    """Train a byte-level BPE on `texts` and write tokenizer.json + tokenizer_config.json to out_dir.
    `split_capitals`: runs of capital letters are never merged (CAPITALS_SPLIT instead of QWEN_SPLIT)."""
    tok = Tokenizer(models.BPE())
    # Qwen2/Qwen3's pre-tokenization: every digit is its own token (numbers are compositional: 594 -> 5 9 4),
    # words keep a leading space, then byte-level mapping.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CAPITALS_SPLIT if split_capitals else QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # the think tokens are added after training, so the final vocabulary is exactly vocab_size at most
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(THINK_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    decoder = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": t in SPECIAL_TOKENS}
               for t in SPECIAL_TOKENS + THINK_TOKENS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "model_max_length": 32768, "added_tokens_decoder": decoder}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok
