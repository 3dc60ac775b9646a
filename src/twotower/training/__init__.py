"""Training: objectives (sampler + loss), in-memory examples, the fit loop, checkpoints.

config.py      TrainingConfig
objectives.py  the six objectives and their configs
data.py        training examples and both sides' inputs; leak-free histories
streaming.py   training examples streamed from Parquet, for data larger than memory
distributed.py several processes under torchrun: DDP, cross-rank gathering
trainer.py     epochs, validation, early stopping, resume
checkpoint.py  atomic, checksummed checkpoints
run_log.py     metrics.jsonl, TensorBoard, curves.png
run.py         a whole run from a config: data, features, training, final metrics
"""
