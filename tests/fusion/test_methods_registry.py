"""The merge-method registry (training/fusion/methods/__init__.py) covers exactly the configurable methods."""


def test_every_configurable_method_is_registered():
    from training.fusion.config import METHODS
    from training.fusion.methods import REGISTRY

    assert sorted(REGISTRY) == sorted(METHODS)
    assert all(REGISTRY[name].name == name for name in REGISTRY)
