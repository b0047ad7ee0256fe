"""Model code: ViT -> adapter -> Qwen3 / Qwen3-MoE decoder, single-device plain PyTorch."""
