"""Dataset sources: embedded offline sets, torchvision sets from a local root, generated sets."""

from cltoolbox.data.base import Dataset

__all__ = ["Dataset", "load_dataset"]


def load_dataset(name: str | None, root: str | None = None, download: bool = False) -> Dataset | None:
    """Load a registered dataset by name (see ``cltoolbox list datasets``)."""
    from cltoolbox.registry import DATASETS

    if name is None:  # a scenario that builds its own data (e.g. `avalanche`): no dataset to load
        return None
    return DATASETS.get(name, "scenario.dataset").factory(root=root, download=download)
