"""prefopt: PPO-with-a-reward-model vs DPO on identical LoRA bases, judged by one harness."""

__version__ = "0.1.0"
