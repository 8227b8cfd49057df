"""Trainer side of true on-policy RL: a differentiable model whose per-token logprobs equal, bit for
bit, those the invariant CPU worker served for the same tokens (invariant.trainer.model), and the
ops that make it so (invariant.trainer.ops). A few lines check parity on your own model::

    from invariant.trainer import PolicyModel
    policy = PolicyModel.from_pretrained("/models/my-qwen3")
    lp = policy.token_logprobs([prompt_ids], [completion_ids])[0]   # fp32, differentiable
    assert lp.tolist() == served_logprobs                            # exact, not approximate

See docs/rl-parity.md.
"""

from invariant.trainer.model import ARCHITECTURES, PolicyModel, TrainerModelError

__all__ = ["ARCHITECTURES", "PolicyModel", "TrainerModelError"]
