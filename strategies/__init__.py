"""Built-in strategies. A strategy is a registered factory whose typed keyword arguments are its
hyperparameters and which returns the plugins that implement it (see ``cltoolbox list strategies``)."""

from cltoolbox.strategies import baselines, replay  # noqa: F401
