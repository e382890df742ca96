"""The maths and environments of reinforcement learning (GRPO): group advantages (:mod:`.advantages`),
token-level policy losses (:mod:`.losses`), and reward environments with a batched, time-limited
dispatcher (:mod:`.environments`). See docs/RL.md "Advantages, losses and environments".

Nothing is imported here on purpose: ``environments`` must stay importable without torch (process-pool
workers unpickle environments and should not pay for ``import torch``).
"""
