"""The core of training, the same for every objective: typed settings (``config``), what
trains (``partition``), the optimizer, the sharded state (``state``), the model inputs
(``inputs``), the losses and the one pure step jitted per batch bucket (``step``)."""
