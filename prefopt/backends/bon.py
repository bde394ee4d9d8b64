"""Best-of-n: no training. For each prompt, n samples from the reference; the one the reward source scores highest
is the response (the DPO paper's and Gao et al. 2023's baseline). Evaluated by the same harness as every policy:
candidate 0 is the reference's own evaluation sample, so n = 1 is the reference exactly. Its KL to the reference
is reported as the analytic value log n - (n-1)/n (Stiennon et al. 2020; exact for continuous scores, an upper
bound otherwise: Beirami et al. 2024), not a sampled estimate, since pi_bon(y) has no closed form to score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefopt.backends._common import TrainData, check_reward_source

TRAINS = False  # the pipeline saves its config only; the harness samples it (prefopt.eval.harness.BestOfN)


@dataclass
class BoNConfig:
    n: int = field(default=4, metadata={"help": "Reference samples per prompt to choose from (1 = the reference).", "positive": True})
    reward: str = field(default="rm", metadata={"help": "What picks the best: 'rm', 'gold', 'hf:<classifier>' or 'py:module:function'."})
    seed: int | None = field(default=None, metadata={"help": "Unused (sampling uses the evaluation seeds); kept for a uniform config."})

    def __post_init__(self):
        check_reward_source("BoNConfig", self.reward)
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"BoNConfig.n must be an integer >= 1, got {self.n!r}")

    def needs_reward_model(self) -> bool:
        return self.reward == "rm"


Config = BoNConfig


def total_steps(cfg: BoNConfig, data: TrainData) -> int:
    return 0


def train(shared, cfg: BoNConfig, data: TrainData, *, role: str = "bon", on_step=None) -> None:
    raise TypeError("best-of-n trains nothing: the pipeline evaluates it through prefopt.eval.harness.BestOfN")
