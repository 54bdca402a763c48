"""Offline tiny models, synthetic data and the one-command demo.

Nothing here touches the network: the tokenizer, the models, the adapters and
the datasets are built locally from configs, seeds and PIL drawings.
"""
