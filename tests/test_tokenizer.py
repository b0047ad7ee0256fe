"""The trained BPE: capital-letter codes stay one token per letter when asked, and transformers reads it alike."""

from transformers import PreTrainedTokenizerFast

from sailvl.data.tokenizer import train_bpe

CORPUS = ["What is written in the image? KN", "The label KN has the largest value.", "Describe the image.",
          "row QZ, column KN: 7", "HELLO World"] * 50


def test_split_capitals_never_merges_letter_codes(tmp_path):
    merged = train_bpe(CORPUS, 400, tmp_path / "plain")
    split = train_bpe(CORPUS, 400, tmp_path / "split", split_capitals=True)
    assert len(merged.encode("KN").ids) == 1  # a frequent code becomes a token of its own ...
    for text, pieces in [("KN", ["K", "N"]), ("QZ", ["Q", "Z"]), ("HELLO", list("HELLO"))]:
        assert [split.id_to_token(i) for i in split.encode(text).ids] == pieces  # ... unless split
    # capitalised words still merge, and decoding is lossless
    assert len(split.encode("Describe").ids) == 1
    text = "What is written in the image? KN\nrow QZ, column KN: 7 ÉCOLE école"
    assert split.decode(split.encode(text).ids) == text


def test_split_capitals_tokenizer_loads_in_transformers(tmp_path):
    tok = train_bpe(CORPUS, 400, tmp_path, split_capitals=True)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ["What is written in the image? KN", "The label QZ has the largest value.", "HELLO World 12"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text).ids
