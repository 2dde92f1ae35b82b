"""Attention-guided audio-video emotion recognition (AVER) on ``fbp_kernels``.

A runnable reference model after Zhang, Wang and Du, "Deep Fusion: An Attention
Guided Factorized Bilinear Pooling for Audio-video Emotion Recognition"
(arXiv 1901.04889). Modules:

- :mod:`aver.model`            ``AttentionAVER``: frame encoders, masked attention, fusion
- :mod:`aver.data`             clip dataset, padding collate, split files, synthetic task
- :mod:`aver.audio`            WAV reading and log-mel frames (stdlib ``wave`` + torch)
- :mod:`aver.video`            frame reading, face crops, CNN frame embeddings
- :mod:`aver.extract_features` media files -> one ``.pt`` feature file per clip (CLI)
- :mod:`aver.metrics`          accuracy, per-class accuracy, macro F1, confusion matrix
- :mod:`aver.train`, :mod:`aver.evaluate`, :mod:`aver.ablation`   command lines

Run the scripts directly (``python examples/aver/train.py --synthetic``) or import
the package with ``examples/`` on ``sys.path``.
"""
