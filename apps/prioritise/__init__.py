"""Channel prioritisation in one place: one BN net trained so that its channels are ordered by importance,
then served at several widths from one set of weights.

* ``penalty``: the BN-scale sparsity and monotonicity penalties, the per-iteration hook of finetune.loop;
* ``widths``: ``python -m apps.prioritise.widths``, standalone sub-networks, one per utilisation level;
* ``towers``: ``python -m apps.prioritise.towers``, one Caffe net of towers at the levels, fine-tuned together;
* ``__main__``: ``python -m apps.prioritise``, the whole method: pretrain, slim, multi-width fine-tune,
  export, evaluate.

Network slimming's criterion and threshold (|gamma| of the BN scales) are the ``bnscale`` criterion of
``python -m prune`` (prune.criteria.bnscale).
"""
