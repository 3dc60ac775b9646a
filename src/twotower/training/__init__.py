"""Training: objectives (sampler + loss), training examples, the fit loop, checkpoints.

config.py      TrainingConfig
objectives.py  the objectives built from their configs
full_softmax.py the full softmax over the corpus, and the training pairs it leaves out
examples/      what one example is (training.examples): interactions in memory or
               streamed, sequences, queries; each kind's batches and loss step
evaluate.py    a model ranked on the held-out parts of its examples
distributed.py several processes under torchrun: DDP, cross-rank gathering
trainer.py     epochs, validation, early stopping, resume
checkpoint.py  atomic, checksummed checkpoints
run_log.py     metrics.jsonl, TensorBoard, curves.png
run.py         a whole run from a config: data, features, training, final metrics
"""
