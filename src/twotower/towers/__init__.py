"""The towers: feature encoders -> MLP or DCN -> L2 normalization, and their cosine score.

config.py    ModelConfig: each tower's network, the temperature
networks.py  MLP and DCN-v2 networks
encoders.py  feature inputs -> embeddings / vectors, concatenated
model.py     Tower, Temperature, TwoTower, embed_rows
onnx.py      save_onnx: a tower as an ONNX graph
history/     history encoders (the HistoryEncoder interface) and multi-interest extractors
"""
