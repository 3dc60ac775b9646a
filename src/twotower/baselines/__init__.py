"""Non-neural baselines that a two-tower model must beat, each ``fit`` then ``score``.

Each takes the (num_queries, N) binary train matrix in ``fit`` and maps query indices
(B,) to (B, N) float32 item scores in ``score``, so its bound ``score`` method is a
``score_fn`` for ``twotower.evaluation.ranking.evaluate``. ``run.BASELINES`` names them;
``run.evaluate_baseline`` ranks with one as the model is ranked.

This file imports nothing, so reading ``baselines.config`` (the config does) does not
load the models or torch.
"""
