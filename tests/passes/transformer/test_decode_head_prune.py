"""Head pruning of a fused decode step (GroupQueryAttention / MultiHeadAttention with past and
present): the key/value heads removed leave the cache too, so the step's past inputs and present
outputs declare the kept heads and generation runs on the result."""

from __future__ import annotations

import numpy as np

from slimgraph.ir import copy_model
from slimgraph.passes.prune import prune_heads
from slimgraph.passes.transformer import FuseAttentionPass
from slimgraph.runtime.generate import generate
from tests import models_lm
from tests.kit.asserts import output_list


def test_pruned_kv_heads_leave_the_declared_cache() -> None:
    _, step = models_lm.exported("llama")  # GroupQueryAttention, 4 heads over 2 kv heads
    kv_after = 1
    fused = copy_model(step)
    FuseAttentionPass()(fused)
    pruned = prune_heads(fused, 0.5).model
    caches = [v for v in [*pruned.graph.inputs, *pruned.graph.outputs]
              if v.name.startswith(("past_key_values.", "present."))]
    assert len(caches) == 8 and {v.shape[1] for v in caches} == {kv_after}
    feeds = models_lm.step_feeds(pruned, batch=2, past=5, new=1)  # past sized as declared
    assert feeds["past_key_values.0.key"].shape == (2, kv_after, 5, 16)
    present = output_list(pruned, feeds)[1]
    assert present.shape == (2, kv_after, 6, 16) and np.isfinite(present).all()
    result = generate(pruned, [1, 2, 3], max_new_tokens=4)  # was: "past_key shall have
    assert len(result.tokens[0]) == 4  # kv_num_heads" on the declared 2 heads
