"""Record an unchanged training script (``reprocheck exec``) or function (``audit``).

The run's process starts here, not in the script: the determinism preset is applied
before the script's first line (:mod:`.run`), then global hooks (:mod:`.hooks`) record
what the script does —

* every DataLoader batch (``_BaseDataLoaderIter.__next__``)   → ``data``
* the output of each outermost call of a model in training mode → ``outputs``
* the scalar ``backward()`` is called on                       → ``loss``
* the gradients of the trained parameters                      → ``grads``
* after the update: parameters, buffers, optimizer state       → ``weights``, ``optimizer``
* the generators' states (kept apart: latent, not observable)  → ``rng``

What a step is: :mod:`.steps`; which modules are models, and their names: :mod:`.naming`;
the processes a script starts, and theirs: :mod:`.processes`.
"""
