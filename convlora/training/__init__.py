"""Machinery for the training scripts: data, noise and loss, checkpoints, mixed precision, metadata.

The scripts in ``train_scripts/`` write the training loop out; what they import lives here:

* :mod:`convlora.training.data`         captioned image folders / `datasets`, preprocessing, latent cache
* :mod:`convlora.training.noise`        per-sample noise and timesteps, targets, Min-SNR loss
* :mod:`convlora.training.checkpoints`  atomic, rotated, pickle-free checkpoints and resume resolution
* :mod:`convlora.training.precision`    frozen weights in half precision, LoRA in float32
* :mod:`convlora.training.metadata`     what a trained LoRA file records about its training
* :mod:`convlora.training.preflight`    checks before any work: output folder writable, resolution fits the models
* :mod:`convlora.training.text_cache`   frozen text encoders' outputs computed once per caption
* :mod:`convlora.training.activation_checkpointing`  non-reentrant checkpointing, so LoRA keeps its gradients
"""
