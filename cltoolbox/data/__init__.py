"""Dataset sources: embedded offline sets, torchvision sets from a local root, generated sets."""

from cltoolbox.data.base import Dataset

__all__ = ["Dataset", "load_dataset"]


def load_dataset(name: str, root: str | None = None, download: bool = False) -> Dataset:
    """Load a registered dataset by name (see ``cltoolbox list datasets``)."""
    from cltoolbox.registry import DATASETS

    return DATASETS.get(name, "scenario.dataset").factory(root=root, download=download)
