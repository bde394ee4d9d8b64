"""Training backends, by name.

Each backend is one module exporting ``Config`` (a dataclass: paper defaults, every field with help text),
``train(shared, cfg, data, *, role, on_step)`` and ``total_steps(cfg, data)``. A policy is named data
(``{"ipo": {"backend": "dpo", "loss_type": "ipo"}}``) and its adapter role on the shared base is its name.
Adding a backend is a module plus one line in :data:`BACKENDS`. Backends never import each other: what they
share lives in ``losses`` (pure functions) and ``_common`` (plumbing). The reward model (``rm``) is a stage
that policies consume, not a policy backend.
"""

from prefopt.backends import bon, dpo, ppo, rloo, sft

BACKENDS = {"ppo": ppo, "dpo": dpo, "sft": sft, "rloo": rloo, "bon": bon}

__all__ = ["BACKENDS"]
