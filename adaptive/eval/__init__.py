"""Evaluation and routing analysis of trained runs.

``heldout`` (validation loss on the run's held-out split or a file), ``scoring`` (batched log-likelihood
of continuations, the one routine behind the tasks and the lm-evaluation-harness adapter), ``tasks``
(offline zero-shot tasks built from the embedded corpus), ``routing`` (depth histogram, selected fraction,
sampling accuracy), ``report`` (what ``adaptive eval`` prints), ``depthmap`` and ``curves`` (what
``adaptive inspect`` draws) and ``lm_eval_adapter`` (the ``adaptive`` model of lm-evaluation-harness).
Everything runs in eval mode: every router decides with its causal inference rule.
"""
