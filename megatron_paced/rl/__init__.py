"""The stages of one RL step, one module each, as plain functions on typed inputs.

``megatron_paced.train.train_step`` calls them in order::

    collect (select -> generate -> score)  ->  replay offer/draw  ->  train batch
        ->  old log-probs  ->  optimize (policy + log-Z)  ->  weight sync  ->  metrics

* :mod:`megatron_paced.rl.collect`: select, generate, score, dynamic-sampling rounds ->
  :class:`~megatron_paced.rl.collect.ScoredGroups`.
* :func:`megatron_paced.paced.replay.offer_and_draw`: replay's part of the step.
* :mod:`megatron_paced.rl.batch`: the train batch from the groups and the replayed samples
  (pure tensors, no process group).
* :mod:`megatron_paced.rl.old_log_probs`: pi_old (and pi_ref) of every row of the batch.
* :mod:`megatron_paced.rl.optimize`: the loss through Megatron's schedule, the policy's and
  the log-Z table's steps.
* :mod:`megatron_paced.rl.evaluate`: held-out pass@k.
* :mod:`megatron_paced.rl.metrics`: metrics.jsonl, wandb, DP reductions, the summary.
"""
