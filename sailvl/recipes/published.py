"""The published SAIL-VL2 shapes with the paper's stage list (shared/SAILVL2.md sections 1 and 5).

Data paths are placeholders under `data_root` (WebDataset shards / JSONL the user provides); step counts
follow the paper's sample counts at its batch size (2048 samples of 8192 packed tokens). Nobody can run these
on a CPU, but they construct, validate and report their shapes (`sailvl train sailvl2_2b --dry-run`).
"""

from __future__ import annotations

from ..config import LLMConfig, SailVLConfig, VisionConfig
from ..train.stages import DataSpec, RunConfig, Stage

SAIL_VIT_HUGE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12,
                     image_size=448, patch_size=14, rms_norm_eps=1e-5)
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                     router_aux_loss_coef=0.001)
BATCH, SEQ = 2048, 8192


def _steps(samples: float) -> int:
    return max(1, int(samples / BATCH))


def _stages(root: str, moe: bool) -> list[Stage]:
    def d(*names: str, weights=None) -> list[DataSpec]:
        return [DataSpec(f"{root}/{n}", w) for n, w in zip(names, weights or [1.0] * len(names))]

    common = dict(max_len=SEQ, rows_per_step=1, grad_accum=BATCH // 8, warmup_steps=100, weight_decay=0.05,
                  loss_weighting="sqrt")
    llm_lr = 1e-5 if not moe else 5e-6
    return [
        Stage("vit_warmup", _steps(8e6), d("captions", "ocr"), trainable=["adapter"], lr={"adapter": 2e-4}, **common),
        Stage("vit_finegrained", _steps(6.7e6), d("captions", "ocr", "video_captions"),
              trainable=["vit", "adapter"], lr={"vit": 2e-5, "adapter": 2e-5}, **common),
        Stage("vit_world", _steps(36.5e6), d("captions", "ocr", "vqa", "math", "text"),
              lr={"vit": 1e-5, "adapter": 1e-5, "llm": 1e-5}, **common),
        Stage("pretrain_basic", _steps(64e6), d("captions", "ocr"), trainable=["adapter"],
              lr={"adapter": 2e-4}, adalrs={"window": 50}, **common),
        Stage("pretrain_multitask", _steps(180e6), d("captions", "ocr", "caption2qa", "vqa", "video", "math", "text",
                                                     weights=[2, 1, 2, 2, 1, 1, 1]),
              lr={"vit": 2e-5, "adapter": 2e-5, "llm": 2e-5}, schedule="wsd", **common),
        Stage("sft_1", _steps(20e6), d("sft_foundation"), lr={"vit": 1e-5, "adapter": 1e-5, "llm": llm_lr}, **common),
        Stage("sft_2", _steps(15e6), d("sft_foundation", "sft_video", weights=[2, 1]),
              lr={"vit": 1e-5, "adapter": 1e-5, "llm": llm_lr}, **common),
        Stage("sft_3", _steps(10e6), d("sft_instruct"), lr={"vit": 1e-5, "adapter": 1e-5, "llm": llm_lr}, **common),
        Stage("sft_4", _steps(5e6), d("sft_highquality"), lr={"vit": 1e-5, "adapter": 1e-5, "llm": llm_lr}, **common),
        # model soup of homologous SFT checkpoints happens between stages: `sailvl soup`
        Stage("longcot_sft", _steps(0.4e6), d("longcot"), lr={"vit": 5e-6, "adapter": 5e-6, "llm": 5e-6}, **common),
        # RL with verifiable rewards (DAPO dense / GSPO MoE) is a separate trainer (later issue)
        Stage("think_fusion_sft", _steps(1e6), d("direct_answers", "longcot", weights=[9, 1]),
              lr={"vit": 5e-6, "adapter": 5e-6, "llm": 5e-6}, **common),
    ]


def _run(name: str, llm: dict, data_root: str, out_dir: str) -> RunConfig:
    model = SailVLConfig(vision_config=VisionConfig(**SAIL_VIT_HUGE), llm_config=LLMConfig(**llm), select_layer=-1,
                         max_dynamic_patch=10)
    return RunConfig(name=name, model=model, tokenizer=f"{data_root}/tokenizer", out_dir=out_dir,
                     stages=_stages(data_root, moe=bool(llm.get("num_experts"))), checkpoint_every=500,
                     activation_checkpointing=True, processor={"use_msac": True})


def sailvl2_2b(data_root: str = "data", out_dir: str = "runs") -> RunConfig:
    return _run("sailvl2_2b", QWEN3_1_7B, data_root, out_dir)


def sailvl2_8b(data_root: str = "data", out_dir: str = "runs") -> RunConfig:
    return _run("sailvl2_8b", QWEN3_8B, data_root, out_dir)


def sailvl2_a3b(data_root: str = "data", out_dir: str = "runs") -> RunConfig:
    return _run("sailvl2_a3b", QWEN3_30B_A3B, data_root, out_dir)
