"""The stages of one RL step, one module each, as plain functions on typed inputs.

* :mod:`megatron_paced.rl.batch`: the train batch from this step's groups and the replayed
  samples (pure tensors, no process group).
* :mod:`megatron_paced.rl.evaluate`: held-out pass@k.

The replay offer/draw is :func:`megatron_paced.paced.replay.offer_and_draw`.
"""
