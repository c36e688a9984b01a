import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The embedded demo's pipeline at toy size (``python -m dpar.demo --tiny``), built once per test session and
    shared by every test that asks for it: ``<root>/demo`` holds the runs and samples the demo ships,
    ``<root>/work`` its intermediates (synthetic images, the token store). Tests read it and write elsewhere."""
    from dpar import demo

    root = tmp_path_factory.mktemp("demo")
    demo.main(["--tiny", "--output", str(root / "demo"), "--work-dir", str(root / "work")])
    return root


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
