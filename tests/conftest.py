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
