"""prefopt's data layer: records, loaders, the sentiment task, splits, simulated annotators, judges.

Everything here is torch-free so loading and validating data stays fast and testable on any
machine; models and trainers consume the plain records defined in ``records``.
"""

from prefopt.data.io import load_pairs, load_prompts, pair_to_row, write_pairs, write_prompts
from prefopt.data.judges import (
    JUDGES,
    CharFrequencyJudge,
    FunctionJudge,
    Judge,
    JudgeError,
    PipelineJudge,
    VaderJudge,
    load_judge,
)
from prefopt.data.records import DataError, Message, PreferencePair, Prompt, PromptRecord, prompt_key
from prefopt.data.split import Split, holdout_pairs, prompts_from_pairs, split_prompts
from prefopt.data.synthetic import AnnotatorConfig, simulate_preferences
from prefopt.data.tasks import sentiment_prompts

__all__ = [
    "JUDGES",
    "AnnotatorConfig",
    "CharFrequencyJudge",
    "JudgeError",
    "DataError",
    "FunctionJudge",
    "Judge",
    "Message",
    "PipelineJudge",
    "PreferencePair",
    "Prompt",
    "PromptRecord",
    "Split",
    "VaderJudge",
    "holdout_pairs",
    "load_judge",
    "load_pairs",
    "load_prompts",
    "pair_to_row",
    "write_pairs",
    "write_prompts",
    "prompt_key",
    "prompts_from_pairs",
    "sentiment_prompts",
    "simulate_preferences",
    "split_prompts",
]
