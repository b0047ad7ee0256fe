import pytest
import torch

from sailvl.config import tiny_config
from sailvl.model.vlm import SailVL


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_model(**kw) -> SailVL:
    cfg = tiny_config(**kw)
    cfg.img_context_token_id = 7
    return SailVL(cfg).eval()


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture
def tiny_moe():
    return make_model(moe=True)


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    """A small byte-level BPE with the SAIL-VL2 special tokens, written to a directory."""
    from sailvl.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok")
    corpus = ["What colour is the circle? red green blue. The answer is 42. Think step by step."] * 30
    train_bpe(corpus, vocab_size=300, out_dir=path)
    return path
